"""MRI artefacts, one definition for two uses: corrupting a scan at a fixed severity (the
robustness report, ensemble/robustness/robustness.py) and augmenting training samples with random amounts
up to severity 2 (`data.artefacts`, gitseg.data.dataset), so that what a model is trained to
withstand is what it is tested on.

Every artefact but Rician noise is a TorchIO transform with a fixed amount (a range of one value,
except the bias field's):

    bias_field       smooth multiplicative field (RandomBiasField: polynomial coefficients drawn
                     from +-amount, the one random amount here)
    gaussian_noise   additive noise, std as a share of the scan's 99.5th percentile
    rician_noise     the magnitude of a complex signal with Gaussian noise (MRI's noise floor;
                     TorchIO has Gaussian noise only)
    motion           rigid motion during the acquisition (RandomMotion, degrees and mm)
    ghosting         ghosts along the phase-encoding direction (RandomGhosting, intensity)
    spike            a k-space spike: stripes (RandomSpike, intensity)
    blur             Gaussian blur, std in mm (RandomBlur)
    lower_resolution in-plane downsampling and back (RandomAnisotropy, factor)
    gamma            contrast change, x ** exp(log_gamma) (RandomGamma)

Images are float with 1.0 at about their 99.5th percentile; the output is clipped at 0 (magnitude
images have no negative intensities).
"""

from __future__ import annotations

import numpy as np
import torch

# Amounts per severity 1, 2, 3.
SEVERITIES = {
    "bias_field": (0.2, 0.4, 0.8),
    "gaussian_noise": (0.02, 0.05, 0.10),
    "rician_noise": (0.02, 0.05, 0.10),
    "motion": (2.0, 5.0, 10.0),          # degrees and mm alike
    "ghosting": (0.3, 0.6, 1.0),
    "spike": (0.5, 1.0, 2.0),
    "blur": (0.5, 1.0, 2.0),
    "lower_resolution": (2.0, 3.0, 4.0),
    "gamma": (0.15, 0.3, 0.5),
}
ARTEFACTS = tuple(SEVERITIES)
TRAINING_SEVERITY = 2  # training draws each amount uniformly between none and this severity's


def check_names(names) -> None:
    unknown = [n for n in names if n not in SEVERITIES]
    if unknown:
        raise ValueError(f"unknown MRI artefact(s) {unknown}; choose from {', '.join(ARTEFACTS)}")


def _transform(name: str, amount: float):
    import torchio as tio  # heavy: only artefacts need TorchIO

    fixed = (amount, amount)
    # The spatial axes of the tensors below are (column, row, slice): in-plane is 0 and 1.
    return {
        # The field is exp of a polynomial whose coefficients TorchIO draws from this range: a range
        # of one value would set all 20 to +amount, a field of e^(20 x amount) across the volume.
        "bias_field": lambda: tio.RandomBiasField(coefficients=(-amount, amount)),
        "gaussian_noise": lambda: tio.RandomNoise(mean=0.0, std=fixed),
        "motion": lambda: tio.RandomMotion(degrees=fixed, translation=fixed, num_transforms=2),
        "ghosting": lambda: tio.RandomGhosting(num_ghosts=(4, 4), axes=(1,), intensity=fixed),
        "spike": lambda: tio.RandomSpike(num_spikes=(1, 1), intensity=fixed),
        "blur": lambda: tio.RandomBlur(std=fixed),
        "lower_resolution": lambda: tio.RandomAnisotropy(axes=(0,), downsampling=fixed),
        "gamma": lambda: tio.RandomGamma(log_gamma=fixed),
    }[name]()


def apply(volume: np.ndarray, spacing, name: str, amount: float) -> np.ndarray:
    """float32 `(D, H, W)` with artefact `name` of `amount`; `spacing` (slice, row, column) mm.
    Random parts (noise, motion paths, the field) come from torch's generator: seed it first."""
    volume = np.asarray(volume, np.float32)
    if name == "rician_noise":
        noise = torch.randn((2, *volume.shape)).numpy() * amount
        out = np.sqrt((volume + noise[0]) ** 2 + noise[1] ** 2)
    elif name == "lower_resolution" and amount <= 1.0:
        out = volume  # a factor of 1 is no downsampling (TorchIO needs more than 1)
    else:
        import torchio as tio  # heavy: only artefacts need TorchIO

        thickness, row_mm, col_mm = spacing
        image = tio.ScalarImage(tensor=torch.from_numpy(np.ascontiguousarray(volume.transpose(2, 1, 0)))[None],
                                affine=np.diag([col_mm, row_mm, thickness, 1.0]))
        out = _transform(name, amount)(image).data[0].numpy().transpose(2, 1, 0)
    return np.clip(out, 0, None).astype(np.float32)


def corrupt(scan: np.ndarray, spacing, name: str, severity: int, seed: int, percentile: float = 99.5) -> np.ndarray:
    """A raw scan `(D, H, W)` scaled so that its `percentile` is 1, then given artefact `name` at
    `severity` (1-3); the same inputs give the same output."""
    scale = float(np.percentile(scan[:, ::2, ::2], percentile)) or 1.0
    torch.manual_seed(seed)
    return apply(np.asarray(scan, np.float32) / scale, spacing, name, SEVERITIES[name][severity - 1])


class Artefacts:
    """Training augmentation: each of `names` applied to a 2.5D sample with probability `prob`, its
    amount drawn uniformly up to TRAINING_SEVERITY's (the lower resolution factor from 1)."""

    def __init__(self, names, prob: float):
        check_names(names)
        if not 0 <= prob <= 1:
            raise ValueError(f"artefact probability must be in [0, 1] (got {prob})")
        self.names, self.prob = list(names), float(prob)

    def __call__(self, image: np.ndarray, spacing) -> np.ndarray:
        """float32 `(C, S, S)` window of slices (in [0, 1]) → the same with artefacts."""
        for name in self.names:
            if float(torch.rand(())) < self.prob:
                top = SEVERITIES[name][TRAINING_SEVERITY - 1]
                low = 1.0 if name == "lower_resolution" else 0.0
                image = apply(image, spacing, name, low + float(torch.rand(())) * (top - low))
        return image
