"""Architectures by name, and loading a state_dict into them safely."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ServingConfig


def _unet(num_classes: int, **params: Any) -> nn.Module:
    from .unet import UNet

    return UNet(num_classes=num_classes, **params)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "unet": _unet,
}


def build_model(arch: str, num_classes: int, **params: Any) -> nn.Module:
    """Instantiate an architecture by name with random weights."""
    try:
        factory = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(sorted(ARCHITECTURES))}") from None
    return factory(num_classes, **params)


def load_state_dict(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a state_dict without ever unpickling code: safetensors, or torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    return torch.load(path, map_location=map_location, weights_only=True)


def load_model(config: ServingConfig, weights_path: str | Path,
               device: str | torch.device = "cpu") -> nn.Module:
    """Build the configured architecture, load its weights strictly, move to device, eval()."""
    model = build_model(config.arch, config.num_classes, **config.arch_params)
    model.load_state_dict(load_state_dict(weights_path, map_location=device), strict=True)
    return model.to(device).eval()
