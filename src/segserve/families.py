"""Model families: every architecture segserve serves, and all it must know about each, in one registry.

A family is one `Family` entry in FAMILIES. It says which `handler.model.arch` names it serves and:

- `build(arch, num_classes, **params)`: the module with random weights (never downloaded), for families
  whose weights file is a state_dict. Such weights are loaded strictly (`load_state_dict(strict=True)`)
  from safetensors or torch.load(weights_only=True): segserve never unpickles code.
- `load(path, device)`: for families whose weights file is the model itself (TorchScript:
  torch.jit.load); leave it None when `build` is given.
- `logits(output)`: the model's forward output -> (N, C, H, W) logits (torchvision's {"out": ...});
  `load_model` wraps the module with it, so the pipeline and the build's check see the same tensor.
- `build_defaults`: what `build_mar.sh --arch ...` assumes unless told (input size, mean/std, whole-image
  inference, whether --classes is needed, arch_params read from the checkpoint such as aux_loss).
- `describe(config)`: what the model's describe answer shows beyond its family and arch.
- `detect(path)`: claims a weights file given without --arch (TorchScript's zip layout).
- `weights_file`: the weights' name in the archive (a state_dict is always stored as safetensors).

Adding a family (segmentation_models_pytorch, Hugging Face transformers, MONAI, torch.export...) is one
more entry: its arch names, a `build` (or a `load` for a file that is the model), a `logits` adapter if
its forward returns something else than a tensor (e.g. `lambda out: out.logits`), and its
`build_defaults`. Its package is imported inside those functions, so a worker that serves another family
never imports it. Nothing else in the worker or the build names a family (but for the build's
--model-file/--model-class flags, which fill in the custom family's arch_params).
"""

from __future__ import annotations

import importlib
import inspect
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ServingConfig

# The file names weights get inside the archive: a safetensors state_dict, or the model file as given.
STATE_FILE, SCRIPT_FILE = "weights.safetensors", "model.torchscript.pt"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BuildDefaults:
    """What the build assumes for a family chosen at build time (--arch, --model-file, a detected file)."""

    input_size: tuple[int, int] | None = None  # None: the base config's
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    # tile=auto never tiles (only images over handler.limits.max_pixels would be, and those are refused):
    # photo models learn whole scenes resized to their input, not windows cut at the image's own scale.
    whole_image: bool = False
    # Its models have their own classes, not the default model's: --classes must be given.
    needs_classes: bool = False
    # arch_params read from the checkpoint's state_dict when none are given, e.g. {"aux_loss": True}.
    params_from_state: Callable[[Mapping[str, torch.Tensor]], dict] | None = None
    # The head its models have where the channel count fits it (segserve.heads), e.g. softmax for torchvision;
    # None: detected from the channels and the class list.
    head: str | None = None


@dataclass(frozen=True)
class Family:
    name: str
    archs: tuple[str, ...]
    build: Callable[..., nn.Module] | None = None
    load: Callable[[Path, torch.device], nn.Module] | None = None
    logits: Callable[[Any], torch.Tensor] | None = None
    build_defaults: BuildDefaults = field(default_factory=BuildDefaults)
    describe: Callable[[ServingConfig], dict] | None = None
    detect: Callable[[Path], bool] | None = None
    weights_file: str = STATE_FILE  # the weights' file name in the archive

    @property
    def state_dict(self) -> bool:
        """True when the weights file is a state_dict for `build`'s module; False when it is the model."""
        return self.build is not None


class LogitsOutput(nn.Module):
    """A model whose forward returns something else than logits, adapted: forward returns the logits."""

    def __init__(self, model: nn.Module, logits: Callable[[Any], torch.Tensor]):
        super().__init__()
        self.model, self._logits = model, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(self.model(x))


def _tensor_or_out(output: Any) -> torch.Tensor:
    """A tensor as it is, or the "out" of a torchvision-style {"out": ..., "aux": ...} dict."""
    if isinstance(output, dict):
        if "out" not in output:
            raise TypeError(f"the model returned a dict without an 'out' entry (keys: {', '.join(map(str, output))})"
                            "; return the (N, classes, H, W) logits or {'out': logits}")
        return output["out"]
    return output


def _describe_params(config: ServingConfig) -> dict:
    return {"arch_params": dict(config.arch_params)}


# -- unet: segserve's own compact U-Net, the default model ------------------------------------------------
def _unet(_arch: str, num_classes: int, **params: Any) -> nn.Module:
    from .unet import UNet

    return UNet(num_classes=num_classes, **params)


# -- torchvision's segmentation models (random weights, never downloaded) ---------------------------------
TORCHVISION_ARCHS = (
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "fcn_resnet50",
    "fcn_resnet101",
    "lraspp_mobilenet_v3_large",
)


def _torchvision(arch: str, num_classes: int, aux_loss: bool = False, **params: Any) -> nn.Module:
    from torchvision.models import segmentation

    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": num_classes, **params}
    if not arch.startswith("lraspp"):
        kwargs["aux_loss"] = aux_loss
    return getattr(segmentation, arch)(**kwargs)


def _aux_loss(state: Mapping[str, torch.Tensor]) -> dict:
    """A checkpoint trained with aux_loss=True carries the auxiliary head: build it to match."""
    return {"aux_loss": any(key.startswith("aux_classifier.") for key in state)}


# -- custom: the user's own nn.Module from a .py file shipped in the archive ------------------------------
def _custom(_arch: str, num_classes: int, module: str | None = None, **params: Any) -> nn.Module:
    """The user's class from their module (a .py file next to the handler in the archive);
    arch_params: module, class, kwargs."""
    class_name = params.pop("class", None)
    if not module or not class_name:
        raise ValueError("a custom model needs arch_params `module` and `class` "
                         "(build_mar.sh --model-file FILE.py --model-class NAME)")
    kwargs = dict(params.pop("kwargs", None) or {})
    if params:
        raise ValueError(f"unknown arch_params for a custom model: {', '.join(params)}")
    cls = getattr(importlib.import_module(module), class_name, None)
    if cls is None:
        raise ValueError(f"{module}.py has no class {class_name!r}")
    if "num_classes" in inspect.signature(cls).parameters and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    return cls(**kwargs)


def _describe_custom(config: ServingConfig) -> dict:
    params = config.arch_params
    return {"module": params.get("module"), "class": params.get("class"), "kwargs": dict(params.get("kwargs") or {})}


# -- torchscript: a scripted or traced model file ---------------------------------------------------------
def _load_torchscript(path: Path, device: torch.device) -> nn.Module:
    return torch.jit.load(str(path), map_location=device)


def is_torchscript(path: Path) -> bool:
    """A torch.jit.save file: a zip holding TorchScript code or constants."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


FAMILIES: tuple[Family, ...] = (
    Family("unet", ("unet",), build=_unet, describe=_describe_params),
    Family("torchvision", TORCHVISION_ARCHS, build=_torchvision, logits=lambda output: output["out"],
           build_defaults=BuildDefaults(input_size=(520, 520), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                        whole_image=True, needs_classes=True, params_from_state=_aux_loss,
                                        head="softmax"),
           describe=_describe_params),
    Family("custom", ("custom",), build=_custom, logits=_tensor_or_out,
           build_defaults=BuildDefaults(needs_classes=True), describe=_describe_custom),
    Family("torchscript", ("torchscript",), load=_load_torchscript, logits=_tensor_or_out,
           describe=lambda config: {"file": config.weights}, detect=is_torchscript, weights_file=SCRIPT_FILE),
)
_BY_ARCH: dict[str, Family] = {arch: family for family in FAMILIES for arch in family.archs}
assert len(_BY_ARCH) == sum(len(family.archs) for family in FAMILIES), "an arch name is claimed by two families"


def architectures() -> list[str]:
    return sorted(_BY_ARCH)


def family_of(arch: str) -> Family:
    try:
        return _BY_ARCH[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(architectures())}") from None


def detect(path: Path) -> Family | None:
    """The family that claims a weights file given without an architecture, if one does."""
    return next((family for family in FAMILIES if family.detect is not None and family.detect(path)), None)


def build_model(arch: str, num_classes: int, **params: Any) -> nn.Module:
    """Instantiate an architecture by name with random weights (its raw module, not adapted)."""
    family = family_of(arch)
    if family.build is None:
        raise ValueError(f"{arch!r} models are loaded from their file, not built: use load_model")
    return family.build(arch, num_classes, **params)


def adapt(arch: str, model: nn.Module) -> nn.Module:
    """The model with its family's output adapter: its forward returns (N, C, H, W) logits."""
    logits = family_of(arch).logits
    return model if logits is None else LogitsOutput(model, logits)


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
    """The configured model with its weights, on `device`, in eval(); its forward returns logits."""
    family = family_of(config.arch)
    device = torch.device(device)
    if family.load is not None:
        model = family.load(Path(weights_path), device)
    else:
        model = build_model(config.arch, config.out_channels, **config.arch_params)
        model.load_state_dict(load_state_dict(weights_path, map_location=device), strict=True)
    return adapt(config.arch, model).to(device).eval()


def describe(config: ServingConfig) -> dict:
    """What the describe answer shows about the model: its family, arch and the family's own details."""
    family = family_of(config.arch)
    return {"family": family.name, "arch": config.arch, **(family.describe(config) if family.describe else {})}
