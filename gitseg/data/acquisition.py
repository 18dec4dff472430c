"""What both synthetic anatomy models (synth.py, phantom.py) share of an MR acquisition: a smooth
texture, a smooth multiplicative bias field and the magnitude image's Rician noise."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def smooth_noise(rng, shape, cells=(6, 10, 10)) -> np.ndarray:
    """Smooth random field of unit-ish amplitude, made at low resolution and upsampled."""
    coarse = rng.normal(0, 1, size=tuple(max(2, min(c, s)) for c, s in zip(cells, shape)))
    return ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=1, mode="nearest")[
        : shape[0], : shape[1], : shape[2]
    ]


def bias_field(u, v, z, c) -> np.ndarray:
    """exp of a low-order polynomial in the in-plane coordinates `u`, `v` (in [-1, 1]) and the scan
    fraction `z`, with the five coefficients `c`."""
    return np.exp(c[0] * u + c[1] * v + c[2] * u * v + c[3] * u**2 + c[4] * (z - 0.5)).astype(np.float32)


def rician_uint16(signal: np.ndarray, sigma: float, rng) -> np.ndarray:
    """The magnitude of `signal` plus complex Gaussian noise of `sigma`, as the 16-bit scan stores it."""
    noisy = np.sqrt((signal + rng.normal(0, sigma, signal.shape).astype(np.float32)) ** 2
                    + rng.normal(0, sigma, signal.shape).astype(np.float32) ** 2)
    return np.clip(np.round(noisy), 0, 65535).astype(np.uint16)
