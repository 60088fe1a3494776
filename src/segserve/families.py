"""Architectures by name, and loading weights into them without ever unpickling code.

- `unet`: segserve's own compact U-Net (the default model).
- torchvision's segmentation models, built with random weights (never downloaded).
- `custom`: the user's own nn.Module, from a .py file shipped in the archive
  (arch_params: module, class, kwargs).
- `torchscript`: a scripted/traced model file, loaded with torch.jit.load.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ServingConfig

TORCHVISION_ARCHS = (
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "fcn_resnet50",
    "fcn_resnet101",
    "lraspp_mobilenet_v3_large",
)


def _unet(num_classes: int, **params: Any) -> nn.Module:
    from .unet import UNet

    return UNet(num_classes=num_classes, **params)


def _torchvision(name: str) -> Callable[..., nn.Module]:
    def factory(num_classes: int, aux_loss: bool = False, **params: Any) -> nn.Module:
        from torchvision.models import segmentation

        kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": num_classes, **params}
        if not name.startswith("lraspp"):
            kwargs["aux_loss"] = aux_loss
        return getattr(segmentation, name)(**kwargs)

    return factory


def _custom(num_classes: int, module: str, **params: Any) -> nn.Module:
    """The user's class from their module (a .py file next to the handler in the archive)."""
    class_name = params.pop("class")
    kwargs = dict(params.pop("kwargs", None) or {})
    if params:
        raise ValueError(f"unknown arch_params for a custom model: {', '.join(params)}")
    cls = getattr(importlib.import_module(module), class_name, None)
    if cls is None:
        raise ValueError(f"{module}.py has no class {class_name!r}")
    if "num_classes" in inspect.signature(cls).parameters and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    return cls(**kwargs)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "unet": _unet,
    "custom": _custom,
    **{name: _torchvision(name) for name in TORCHVISION_ARCHS},
}


def build_model(arch: str, num_classes: int, **params: Any) -> nn.Module:
    """Instantiate an architecture by name with random weights."""
    try:
        factory = ARCHITECTURES[arch]
    except KeyError:
        choices = ", ".join(sorted([*ARCHITECTURES, "torchscript"]))
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {choices}") from None
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
    if config.arch == "torchscript":
        return torch.jit.load(str(weights_path), map_location=device).eval()
    model = build_model(config.arch, config.num_classes, **config.arch_params)
    model.load_state_dict(load_state_dict(weights_path, map_location=device), strict=True)
    return model.to(device).eval()
