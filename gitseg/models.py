"""Building segmentation-models-pytorch models by name, validated up front.

Every smp architecture with any smp encoder (native names or `tu-<timm name>`), in_channels
from the 2.5D window, 3 sigmoid outputs (multi-label), and optionally smp's auxiliary
classification head as an empty-slice gate.
"""

from __future__ import annotations

import copy
import math
import pickle
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from gitseg.config import ConfigError, ModelConfig

NUM_CLASSES = 3
ARCHITECTURES = ("Unet", "UnetPlusPlus", "MAnet", "Linknet", "FPN", "PSPNet", "DeepLabV3",
                 "DeepLabV3Plus", "PAN", "UPerNet", "Segformer", "DPT")


def _smp():
    with warnings.catch_warnings():  # smp is heavy (it loads timm) and warns at import
        warnings.simplefilter("ignore")
        import segmentation_models_pytorch as smp
    return smp


def encoder_names() -> list[str]:
    return list(_smp().encoders.get_encoder_names())


def check_model_names(cfg: ModelConfig) -> None:
    """Model settings that cannot be built raise ConfigError; unknown names list the valid ones."""
    if cfg.arch not in ARCHITECTURES:
        raise ConfigError(f"model.arch: unknown architecture {cfg.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if cfg.encoder.startswith("tu-"):
        import timm  # heavy: loaded only for tu- encoders

        if not timm.is_model(cfg.encoder[3:]):
            close = timm.list_models(f"*{cfg.encoder[3:].split('_')[0]}*")[:10]
            raise ConfigError(f"model.encoder: timm has no model {cfg.encoder[3:]!r} "
                              f"(similar: {', '.join(close) or 'none'})")
    elif cfg.encoder not in encoder_names():
        raise ConfigError(f"model.encoder: unknown encoder {cfg.encoder!r}; choose one of "
                          f"{', '.join(encoder_names())}, or tu-<timm model name>")
    if cfg.head_prior is not None and not 0 < cfg.head_prior < 1:
        raise ConfigError(f"model.head_prior must be in (0, 1) or null (got {cfg.head_prior})")
    if cfg.arch == "DPT" and not cfg.encoder.startswith("tu-"):
        raise ConfigError("model.encoder: DPT needs a timm encoder (tu-<name>), e.g. tu-vit_base_patch16_224")


def build_model(cfg: ModelConfig, in_channels: int) -> nn.Module:
    """The model; its forward returns mask logits `(N, 3, H, W)`, or (mask logits, gate logits `(N, 3)`)."""
    check_model_names(cfg)
    weights = cfg.encoder_weights
    local = weights is not None and (Path(weights).suffix in (".pt", ".pth", ".bin", ".safetensors")
                                     or Path(weights).exists())
    smp = _smp()
    reserved = {"encoder_name", "encoder_weights", "in_channels", "classes", "aux_params"} & set(cfg.options)
    if reserved:
        raise ConfigError(f"model.options: {', '.join(sorted(reserved))} come from the other model keys and the "
                          f"data window; remove them from model.options")
    kwargs = dict(encoder_name=cfg.encoder, encoder_weights=None if local else weights,
                  in_channels=in_channels, classes=NUM_CLASSES, **cfg.options)
    if cfg.gate:
        kwargs["aux_params"] = dict(classes=NUM_CLASSES, dropout=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = getattr(smp, cfg.arch)(**kwargs)
        except (ValueError, KeyError, RuntimeError, AssertionError, TypeError) as exc:
            options = f" and options {cfg.options}" if cfg.options else ""
            raise ConfigError(f"model: {cfg.arch} with encoder {cfg.encoder}{options} cannot be built: {exc}") from None
    if local:
        load_encoder_weights(model, Path(weights))
    if cfg.head_prior is not None:
        set_head_prior(model, cfg.head_prior)
    return model


def set_head_prior(model: nn.Module, prior: float) -> None:
    """Start the mask head at foreground probability `prior` everywhere (RetinaNet's prior init).

    With smp's default init every pixel starts near probability 0.5, so an untrained model marks
    every slice as organ, and the first epochs are spent unlearning that: their validation scores
    say how fast a configuration stops predicting everything, not how well it segments.
    """
    # The head's last convolution to the class logits (DPT's head is not a plain Sequential).
    conv = [m for m in model.segmentation_head.modules()
            if isinstance(m, nn.Conv2d) and m.out_channels == NUM_CLASSES][-1]
    with torch.no_grad():
        # Small weights as in RetinaNet, so the bias sets the start whatever the head's fan-in (DPT: 256).
        conv.weight.normal_(0.0, 0.01)
        conv.bias.fill_(math.log(prior / (1 - prior)))


def load_encoder_weights(model: nn.Module, path: Path) -> None:
    """Load a local encoder state dict (the encoder's own keys, or a full model's `encoder.` keys)."""
    if not path.is_file():
        raise FileNotFoundError(f"model.encoder_weights: no file {path}; give a local weights file, a named "
                                f"weight set, or null for random weights")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # optional: only for .safetensors weights

        state = load_file(str(path))
    else:
        try:  # weights_only: tensors and plain values; a file that pickles code is refused, never run
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as exc:
            raise ConfigError(f"model.encoder_weights: torch cannot read {path} as weights "
                              f"({str(exc).strip().splitlines()[0][:160]}); give a state dict of tensors") from None
        state = state.get("model", state) if isinstance(state, dict) else state
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    missing, unexpected = model.encoder.load_state_dict(state, strict=False)
    if len(missing) > len(state) or not state:
        raise ConfigError(f"model.encoder_weights: {path} does not fit encoder {type(model.encoder).__name__} "
                          f"({len(missing)} missing, {len(unexpected)} unexpected keys)")


def split_outputs(output) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mask logits, gate logits or None) from a model's forward output."""
    if isinstance(output, (tuple, list)):
        return output[0], output[1]
    return output, None


def check_input_size(model: nn.Module, in_channels: int, size: int, arch: str) -> None:
    """One dry forward at the training size: catches sizes an architecture cannot take."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits, _ = split_outputs(model(torch.zeros(1, in_channels, size, size)))
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"model: {arch} cannot take {size}x{size} inputs ({str(exc).splitlines()[0]}); "
                          f"choose another architecture or prepare the cache at a larger --size "
                          f"(PAN needs at least 128)") from None
    finally:
        model.train(was_training)
    if tuple(logits.shape[-2:]) != (size, size):
        raise ConfigError(f"model: {arch} returns {tuple(logits.shape[-2:])} for {size}x{size} inputs")


def check_parameters_used(model: nn.Module, in_channels: int, size: int, cfg: ModelConfig) -> None:
    """One training step's backward on a copy: every parameter must get a gradient, or DDP stops the
    run with an error about unused parameters (e.g. model.options encoder_depth below 5 with a timm
    encoder: its last blocks are built but never used)."""
    probe = copy.deepcopy(model).train()
    logits, gate = split_outputs(probe(torch.zeros(2, in_channels, size, size)))
    (logits.sum() + (gate.sum() if gate is not None else 0)).backward()
    unused = [name for name, p in probe.named_parameters() if p.requires_grad and p.grad is None]
    if unused:
        raise ConfigError(f"model: {cfg.arch} with encoder {cfg.encoder} and options {cfg.options} leaves "
                          f"{len(unused)} parameters unused (e.g. {unused[0]}), which distributed training "
                          f"refuses; with a timm encoder keep encoder_depth at 5 and slim decoder_channels instead")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / torch.compile wrappers (for checkpoints)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
