"""Model families: every architecture segserve serves, and all it must know about each, in one registry.

A family is one `Family` entry in FAMILIES. It says which `handler.model.arch` names it serves (`archs`,
or every name after a `prefix` such as `smp:` that its library knows, listed by `names`) and:

- `build(arch, channels, /, **params)`: the module with random weights (never downloaded) and `channels`
  output channels, for families whose weights are a state_dict. Such weights are loaded strictly
  (`load_state_dict(strict=True)`) from safetensors or torch.load(weights_only=True): segserve never
  unpickles code.
- `load(path, device)`: for families whose weights file is the model itself (TorchScript: torch.jit.load,
  torch.export: torch.export.load); leave it None when `build` is given.
- `logits(output)`: the model's forward output -> (N, C, h, w) logits (torchvision's {"out": ...}, Hugging
  Face's `.logits`); `load_model` wraps the module with it, so the pipeline and the build's check see the
  same tensor (any h, w: masks are upsampled to each image's size).
- `build_defaults`: what `build_mar.sh --arch ...` assumes unless told (input size, mean/std, whole-image
  inference, whether --classes is needed, what it reads from the user's files).
- `describe(config)`: what the model's describe answer shows beyond its family and arch.
- `detect(path)`: claims a weights file (or folder) given without --arch.
- `weights_file`: the weights' name in the archive (a state_dict is always stored as safetensors).
- `requires` / `extra`: the distributions it imports (the archive records their versions in
  `handler.model.requires`) and the segserve extra that installs them; a worker without them fails to
  load with a message naming the extra.
- `runs_code`: its file is code (a model file, TorchScript, an exported program): the build takes it only
  with --trust-code, and such an archive runs that code at build and in every worker.

Adding a family is one more entry. Its package is imported inside its functions, so a worker that serves
another family never imports it. Nothing else in the worker or the build names a family (but for the
build's --model-file/--model-class flags, which fill in the custom family's arch_params).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import json
import logging
import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ServingConfig

logger = logging.getLogger(__name__)

# The file names weights get inside the archive: a safetensors state_dict, or the model file as given.
STATE_FILE, SCRIPT_FILE, EXPORT_FILE = "weights.safetensors", "model.torchscript.pt", "model.pt2"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# segserve never downloads: the hub libraries' offline switches, on for every process that imports this module
# (the build, every worker) before any of them is imported; they read these at import.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1"}
os.environ.update(OFFLINE_ENV)


class MissingDependencyError(ImportError):
    """The archive's model needs a package this environment lacks; the message names the extra to install."""


@dataclass(frozen=True)
class Suggested:
    """What a family reads from the user's weights at build (a Hugging Face folder's config, an exported
    program's input shape): used where the build's flags do not say otherwise."""

    arch_params: dict | None = None
    classes: list | None = None
    input_size: list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None


@dataclass(frozen=True)
class BuildDefaults:
    """What the build assumes for a family chosen at build time (--arch, --model-file, a detected file)."""

    input_size: tuple[int, int] | None = None  # None: the base config's
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    # tile=auto never tiles (only images over handler.limits.max_pixels would be, and those are refused):
    # photo models learn whole scenes resized to their input, not windows cut at the image's own scale.
    whole_image: bool = False
    # Its models have their own classes, not the default model's: --classes must be given (unless read).
    needs_classes: bool = False
    # arch_params read from the checkpoint's state_dict when none are given, e.g. {"aux_loss": True}.
    params_from_state: Callable[[Mapping[str, torch.Tensor]], dict] | None = None
    # The head its models have where the channel count fits it (segserve.heads), e.g. softmax for torchvision;
    # None: detected from the channels and the class list.
    head: str | None = None
    # For weights that are no plain state_dict file (a Hugging Face folder): (state_dict, Suggested).
    read_weights: Callable[[Path, dict], tuple[dict[str, torch.Tensor], Suggested]] | None = None
    # For a file that is the model (an exported program): what it says about its input.
    inspect_file: Callable[[Path], Suggested] | None = None


@dataclass(frozen=True)
class Family:
    name: str
    archs: tuple[str, ...] = ()
    build: Callable[..., nn.Module] | None = None
    load: Callable[[Path, torch.device], nn.Module] | None = None
    logits: Callable[[Any], torch.Tensor] | None = None
    build_defaults: BuildDefaults = field(default_factory=BuildDefaults)
    describe: Callable[[ServingConfig], dict] | None = None
    detect: Callable[[Path], bool] | None = None
    weights_file: str = STATE_FILE  # the weights' file name in the archive
    prefix: str | None = None  # e.g. "smp:": serves "smp:<name>" for every name its library knows
    names: Callable[[], list[str]] | None = None  # those names (imports the library)
    requires: tuple[str, ...] = ()  # distributions it imports, recorded with their versions in the archive
    extra: str | None = None  # the segserve extra that installs them
    runs_code: bool = False  # the model file is code: built only with --trust-code

    @property
    def state_dict(self) -> bool:
        """True when the weights file is a state_dict for `build`'s module; False when it is the model."""
        return self.build is not None

    def arch_names(self) -> list[str]:
        """Every arch name this family serves (a prefix family's from its library, which must be installed)."""
        if self.prefix is None:
            return list(self.archs)
        return [f"{self.prefix}{name}" for name in self.names()]


class LogitsOutput(nn.Module):
    """A model whose forward returns something else than logits, adapted: forward returns the logits."""

    def __init__(self, model: nn.Module, logits: Callable[[Any], torch.Tensor]):
        super().__init__()
        self.model, self._logits = model, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(self.model(x))


def _tensor_or_out(output: Any) -> torch.Tensor:
    """A tensor as it is, the "out" of a torchvision-style {"out": ..., "aux": ...} dict, or the first of a
    (mask, extra) tuple (smp's aux_params classifier, deep-supervision lists)."""
    if isinstance(output, dict):
        if "out" not in output:
            raise TypeError(f"the model returned a dict without an 'out' entry (keys: {', '.join(map(str, output))})"
                            "; return the (N, classes, H, W) logits or {'out': logits}")
        return output["out"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return output


def _describe_params(config: ServingConfig) -> dict:
    return {"arch_params": dict(config.arch_params)}


def _library(module: str, family: str) -> Any:
    """Import a family's library, or say which segserve extra installs it."""
    os.environ.update(OFFLINE_ENV)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = next((f.extra for f in FAMILIES if f.name == family), family)
        raise MissingDependencyError(f"{family} models need the {module} package ({exc}): install segserve's "
                                     f"{extra!r} extra ({install_hint(extra)})") from None


def install_hint(extra: str) -> str:
    return (f"pip install 'segserve[{extra}]'; from a segserve checkout: pip install -e '.[server,{extra}]'; "
            f"container images: --build-arg SEGSERVE_EXTRAS={extra}")


def _refuse(params: dict, family: str, reasons: Mapping[str, str]) -> None:
    for key, reason in reasons.items():
        if key in params:
            raise ValueError(f"{family} arch_params: {key} cannot be set ({reason})")


def _name_after(prefix: str, arch: str) -> str:
    return arch[len(prefix):]


# -- unet: segserve's own compact U-Net, the default model ------------------------------------------------
def _unet(_arch: str, channels: int, /, **params: Any) -> nn.Module:
    from .unet import UNet

    return UNet(num_classes=channels, **params)


# -- torchvision's segmentation models (random weights, never downloaded) ---------------------------------
TORCHVISION_ARCHS = (
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "fcn_resnet50",
    "fcn_resnet101",
    "lraspp_mobilenet_v3_large",
)


def _torchvision(arch: str, channels: int, /, aux_loss: bool = False, **params: Any) -> nn.Module:
    from torchvision.models import segmentation

    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": channels, **params}
    if not arch.startswith("lraspp"):
        kwargs["aux_loss"] = aux_loss
    return getattr(segmentation, arch)(**kwargs)


def _aux_loss(state: Mapping[str, torch.Tensor]) -> dict:
    """A checkpoint trained with aux_loss=True carries the auxiliary head: build it to match."""
    return {"aux_loss": any(key.startswith("aux_classifier.") for key in state)}


# -- smp: segmentation_models_pytorch, every architecture smp.create_model knows ---------------------------
SMP = "smp:"


def _smp_names() -> list[str]:
    smp = _library("segmentation_models_pytorch", "smp")
    return [cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()]


def _smp(arch: str, channels: int, /, **params: Any) -> nn.Module:
    smp = _library("segmentation_models_pytorch", "smp")
    name = _name_after(SMP, arch)
    if name.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
        raise ValueError(f"unknown segmentation_models_pytorch architecture {name!r}; choose one of: "
                         f"{', '.join(SMP + n for n in _smp_names())}")
    _refuse(params, "smp", {"classes": "the output channels follow --classes",
                            "in_channels": "segserve feeds RGB images: 3 channels"})
    if params.get("encoder_weights") is not None:
        raise ValueError("smp arch_params: encoder_weights must stay unset: segserve never downloads, and your "
                         "weights file already holds the encoder's weights")
    if params.get("activation") not in (None, "identity"):
        raise ValueError("smp arch_params: activation must stay unset: segserve takes the model's logits "
                         "(the weights are the same without it)")
    params = {key: value for key, value in params.items() if key not in ("encoder_weights", "activation")}
    return smp.create_model(name, encoder_weights=None, classes=channels, **params)


# -- monai: MONAI's networks, 2-D (images) or 3-D (NIfTI volumes) ----------------------------------------------------
MONAI = "monai:"


def _monai_names() -> list[str]:
    nets = _library("monai.networks.nets", "monai")
    names = []
    for name in sorted(dir(nets)):
        cls = getattr(nets, name)
        if inspect.isclass(cls) and issubclass(cls, nn.Module):
            parameters = inspect.signature(cls.__init__).parameters
            if {"spatial_dims", "in_channels", "out_channels"} <= set(parameters):
                names.append(name)
    return names


def _monai(arch: str, channels: int, /, **params: Any) -> nn.Module:
    nets = _library("monai.networks.nets", "monai")
    name = _name_after(MONAI, arch)
    if name not in _monai_names():
        raise ValueError(f"unknown MONAI network {name!r} (a class of monai.networks.nets taking spatial_dims, "
                         f"in_channels and out_channels); choose one of: "
                         f"{', '.join(MONAI + n for n in _monai_names())}")
    params = dict(params)
    spatial_dims = params.pop("spatial_dims", 2)
    if spatial_dims not in (2, 3):
        raise ValueError(f"monai arch_params: spatial_dims is 2 (images) or 3 (NIfTI volumes, with input.size "
                         f"[depth, height, width]), got {spatial_dims!r}")
    if spatial_dims == 2:
        _refuse(params, "monai", {"in_channels": "RGB images: 3"})
    # A 3-D model takes the windowed volume as one channel, or repeated over its in_channels.
    in_channels = params.pop("in_channels", 1) if spatial_dims == 3 else 3
    _refuse(params, "monai", {"out_channels": "the output channels follow --classes"})
    if params.get("pretrained"):
        raise ValueError("monai arch_params: pretrained must stay false: segserve never downloads, and your "
                         "weights file already holds the backbone's weights")
    return getattr(nets, name)(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=channels, **params)


# -- hf: a Hugging Face transformers semantic-segmentation model, from its save_pretrained folder ----------
HF_CONFIG, HF_PROCESSOR, HF_PROCESSORS = "config.json", "preprocessor_config.json", "processor_config.json"
# The model types whose output is per-query classes and masks (semantic maps made as their image processors'
# post_process_semantic_segmentation makes them). DETR's panoptic masks have no per-class map: not served.
HF_QUERY_TYPES = ("mask2former", "maskformer", "oneformer")
# OneFormer is told its task by tokenized text: "the task is semantic", as OneFormerProcessor words it.
ONEFORMER_TASK = "the task is semantic"


class OneFormerSemantic(nn.Module):
    """A OneFormer asked for semantic segmentation: its task tokens (read from the folder's tokenizer at build,
    kept in arch_params) given with every batch, so the worker needs no tokenizer."""

    def __init__(self, model: nn.Module, task_inputs: list[int]):
        super().__init__()
        self.model = model
        self.register_buffer("task_inputs", torch.tensor([task_inputs], dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(pixel_values=x, task_inputs=self.task_inputs.expand(x.shape[0], -1))


def is_hf_folder(path: Path) -> bool:
    """A `save_pretrained` folder: config.json beside the weights."""
    return path.is_dir() and (path / HF_CONFIG).is_file()


def _hf_auto_class(transformers: Any, model_type: str) -> Any:
    from transformers.models.auto import modeling_auto

    if model_type in modeling_auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES:
        return transformers.AutoModelForSemanticSegmentation
    if model_type in HF_QUERY_TYPES and model_type in modeling_auto.MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES:
        return transformers.AutoModelForUniversalSegmentation
    served = sorted(modeling_auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES) + list(HF_QUERY_TYPES)
    raise ValueError(f"Hugging Face model type {model_type!r} is not served: segserve serves the "
                     f"semantic-segmentation types ({', '.join(served)})")


def _hf_config(transformers: Any, config: dict, channels: int | None = None) -> Any:
    """The model's config from the saved config.json's contents (no hub, no remote code)."""
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError("a Hugging Face model needs arch_params.config: the contents of its config.json "
                         "(build_mar.sh --weights FOLDER reads it)")
    if config.get("auto_map"):
        raise ValueError("this Hugging Face config names code of its own (auto_map, trust_remote_code): "
                         "segserve never runs a model's remote code; export it with torch.export instead")
    model_type = config["model_type"]
    if model_type not in transformers.CONFIG_MAPPING:
        raise ValueError(f"unknown Hugging Face model type {model_type!r} for transformers "
                         f"{transformers.__version__}")
    hf_config = transformers.CONFIG_MAPPING[model_type].from_dict(config)
    if channels is not None and hf_config.num_labels != channels:
        hf_config.num_labels = channels  # its weights then do not fit: the build lists the classifier's shapes
    return hf_config


def _hf(_arch: str, channels: int, /, config: dict | None = None, task_inputs: list[int] | None = None,
        **params: Any) -> nn.Module:
    transformers = _library("transformers", "hf")
    if params:
        raise ValueError(f"unknown arch_params for a Hugging Face model: {', '.join(params)} (config, task_inputs)")
    hf_config = _hf_config(transformers, config, channels)
    model = _hf_auto_class(transformers, hf_config.model_type).from_config(hf_config)
    if hf_config.model_type == "oneformer":
        if not task_inputs:
            raise ValueError("a OneFormer needs arch_params.task_inputs (build_mar.sh reads them from its folder)")
        return OneFormerSemantic(model, task_inputs)
    return model


def _hf_logits(output: Any) -> torch.Tensor:
    """`.logits` (SegFormer's at 1/4 of the input, upsampled by the pipeline like any model's), or for
    Mask2Former/MaskFormer the log of their semantic scores: sum over queries of each query's class
    probability (without the null class) times its mask probability, as
    Mask2FormerImageProcessor.post_process_semantic_segmentation computes them. Their argmax is its map, and
    softmax normalizes them over the classes."""
    logits = getattr(output, "logits", None)
    if logits is not None:
        return logits
    classes, masks = getattr(output, "class_queries_logits", None), getattr(output, "masks_queries_logits", None)
    if classes is None or masks is None:
        raise TypeError(f"the Hugging Face model returned {type(output).__name__} without logits or "
                        "class/mask queries")
    scores = torch.einsum("bqc,bqhw->bchw", classes.softmax(dim=-1)[..., :-1], masks.sigmoid())
    return scores.clamp_min(torch.finfo(scores.dtype).tiny).log()


def read_hf_folder(folder: Path, params: dict) -> tuple[dict[str, torch.Tensor], Suggested]:
    """A save_pretrained folder, loaded strictly by transformers from its own files (its safetensors weights,
    checkpoint keys mapped as transformers maps them): the state_dict of the model `_hf` builds, and the
    classes, input size and normalization its config and preprocessor config give."""
    transformers = _library("transformers", "hf")
    config = json.loads((folder / HF_CONFIG).read_text())
    hf_config = _hf_config(transformers, config)
    auto = _hf_auto_class(transformers, hf_config.model_type)
    if params:
        raise ValueError(f"a Hugging Face folder takes no --arch-param (got {', '.join(params)}): its config.json "
                         "says everything")
    try:
        model, info = auto.from_pretrained(str(folder), config=hf_config, local_files_only=True,
                                           use_safetensors=True, output_loading_info=True)
    except OSError as exc:
        raise ValueError(f"cannot load the Hugging Face folder {folder}: {str(exc).splitlines()[0]} (segserve "
                         "reads safetensors only: save with model.save_pretrained(folder))") from None
    except RuntimeError as exc:  # transformers refuses shape mismatches after logging its load report
        raise ValueError(f"weights in {folder} do not fit its {HF_CONFIG} (transformers' load report above lists "
                         f"the keys): {str(exc).splitlines()[-1]}") from None
    problems = {name: sorted(map(str, info.get(key) or ())) for name, key in
                (("missing keys", "missing_keys"), ("unexpected keys", "unexpected_keys"),
                 ("shape mismatches", "mismatched_keys"))}
    if any(problems.values()):
        lines = [f"weights in {folder} do not fit {type(model).__name__}:"]
        lines += [f"  {name} ({len(keys)}): {', '.join(keys[:10])}" for name, keys in problems.items() if keys]
        raise ValueError("\n".join(lines))
    id2label = {int(key): value for key, value in hf_config.id2label.items()}
    classes = [str(id2label[index]) for index in sorted(id2label)] if len(id2label) >= 2 else None
    suggested = dict(arch_params={"config": config}, classes=classes)
    if hf_config.model_type == "oneformer":
        task_inputs = _oneformer_task(transformers, folder)
        suggested["arch_params"]["task_inputs"] = task_inputs
        model = OneFormerSemantic(model, task_inputs)
    if (folder / HF_PROCESSOR).is_file():
        suggested.update(_processor_settings(json.loads((folder / HF_PROCESSOR).read_text())))
    elif (folder / HF_PROCESSORS).is_file():  # a processor's (image processor and tokenizer) settings
        image_processor = json.loads((folder / HF_PROCESSORS).read_text()).get("image_processor")
        suggested.update(_processor_settings(image_processor) if isinstance(image_processor, dict) else {})
    state = {key: value.detach() for key, value in model.state_dict().items()}
    return state, Suggested(**suggested)


def _oneformer_task(transformers: Any, folder: Path) -> list[int]:
    """The semantic task's tokens, as the folder's OneFormerProcessor makes them (its tokenizer, padded to its
    task_seq_length)."""
    try:
        processor = transformers.OneFormerProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"a OneFormer folder needs its processor beside the model (its tokenizer words the task): "
                         f"processor.save_pretrained(folder) ({str(exc).splitlines()[0]})") from None
    # OneFormerProcessor's own task encoding (it is what its __call__ does with task_inputs).
    tokens = processor._preprocess_text([ONEFORMER_TASK], max_length=processor.task_seq_length)
    return [int(v) for v in tokens[0]]


def _processor_settings(doc: dict) -> dict:
    """Input size and normalization from an image processor's preprocessor_config.json (its pixels rescaled to
    0..1 as segserve's are; do_normalize false: none)."""
    settings: dict[str, Any] = {}
    if doc.get("do_normalize", True) and doc.get("image_mean") and doc.get("image_std"):
        settings.update(mean=[float(v) for v in doc["image_mean"]], std=[float(v) for v in doc["image_std"]])
    elif doc.get("do_normalize") is False:
        settings.update(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    size = doc.get("size")
    if isinstance(size, int):
        settings["input_size"] = [size, size]
    elif isinstance(size, dict) and size.get("height") and size.get("width"):
        settings["input_size"] = [int(size["height"]), int(size["width"])]
    elif isinstance(size, dict) and size.get("shortest_edge"):
        settings["input_size"] = [int(size["shortest_edge"])] * 2
    return settings


def _describe_hf(config: ServingConfig) -> dict:
    hf_config = config.arch_params.get("config") or {}
    return {"model_type": hf_config.get("model_type"), "architectures": hf_config.get("architectures")}


# -- custom: the user's own nn.Module from a .py file shipped in the archive ------------------------------
def _custom(_arch: str, channels: int, /, module: str | None = None, **params: Any) -> nn.Module:
    """The user's class from their module (a .py file next to the handler in the archive);
    arch_params: module, class, kwargs."""
    class_name = params.pop("class", None)
    if not module or not class_name:
        raise ValueError("a custom model needs arch_params `module` and `class` "
                         "(build_mar.sh --model-file FILE.py --model-class NAME --trust-code)")
    kwargs = dict(params.pop("kwargs", None) or {})
    if params:
        raise ValueError(f"unknown arch_params for a custom model: {', '.join(params)}")
    cls = getattr(importlib.import_module(module), class_name, None)
    if cls is None:
        raise ValueError(f"{module}.py has no class {class_name!r}")
    if "num_classes" in inspect.signature(cls).parameters and "num_classes" not in kwargs:
        kwargs["num_classes"] = channels
    return cls(**kwargs)


def _describe_custom(config: ServingConfig) -> dict:
    params = config.arch_params
    return {"module": params.get("module"), "class": params.get("class"), "kwargs": dict(params.get("kwargs") or {})}


# -- torchscript: a scripted or traced model file ---------------------------------------------------------
def _load_torchscript(path: Path, device: torch.device) -> nn.Module:
    return torch.jit.load(str(path), map_location=device)


def is_torchscript(path: Path) -> bool:
    """A torch.jit.save file: a zip holding TorchScript code or constants."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


# -- export: a torch.export program (.pt2) ----------------------------------------------------------------
# torch.export.load is no safe loader (torch 2.14, torch/export/pt2_archive/_package.py and
# torch/_export/serde/serialize.py): it torch.load()s the program's sample inputs with weights_only=False
# when weights_only=True fails, loads tensor-subclass weights and constants with weights_only=False,
# pickle.loads opaque constants and sympify()s (eval) shape expressions. A crafted .pt2 runs code, so an
# exported program is code, like TorchScript: the build takes it only with --trust-code.
def is_exported_program(path: Path) -> bool:
    """A torch.export.save file: a zip whose archive_format record says pt2."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = [name for name in archive.namelist() if name.endswith("archive_format")]
        return any(archive.read(name).strip() == b"pt2" for name in names)


class ExportedModule(nn.Module):
    """An exported program's module. Its train/eval behaviour was fixed when it was exported, and torch refuses
    train()/eval() on it: this holder takes them without passing them on."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.program = module

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> Any:
        return self.program(x)


def _load_exported(path: Path, device: torch.device) -> nn.Module:
    return ExportedModule(torch.export.load(str(path)).module()).to(device)


def inspect_exported(path: Path) -> Suggested:
    """The exported program's one image input: refuse a fixed batch dimension, suggest its height and width."""
    program = torch.export.load(str(path))
    inputs = [node for node in program.graph.nodes if node.op == "placeholder"
              and node.name in program.graph_signature.user_inputs]
    shapes = [tuple(node.meta["val"].shape) for node in inputs if isinstance(node.meta.get("val"), torch.Tensor)]
    if len(inputs) != 1 or len(shapes) != 1 or len(shapes[0]) != 4:
        raise ValueError(f"the exported program takes {len(inputs)} inputs {shapes}: segserve feeds one "
                         "(N, 3, H, W) image batch")
    batch, _, height, width = shapes[0]
    if not isinstance(batch, torch.SymInt):
        raise ValueError(f"the exported program's batch dimension is fixed at {batch}: segserve batches requests "
                         "and tiling windows, so export with a dynamic one, e.g. torch.export.export(model, (x,), "
                         "dynamic_shapes=({0: torch.export.Dim('batch')},))")
    size = [height, width] if all(isinstance(v, int) for v in (height, width)) else None
    return Suggested(input_size=size)


def _describe_file(config: ServingConfig) -> dict:
    return {"file": config.weights}


FAMILIES: tuple[Family, ...] = (
    Family("unet", ("unet",), build=_unet, describe=_describe_params),
    Family("torchvision", TORCHVISION_ARCHS, build=_torchvision, logits=lambda output: output["out"],
           build_defaults=BuildDefaults(input_size=(520, 520), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                        whole_image=True, needs_classes=True, params_from_state=_aux_loss,
                                        head="softmax"),
           describe=_describe_params),
    # smp encoders are trained on ImageNet: its statistics unless --mean/--std say otherwise.
    Family("smp", build=_smp, logits=_tensor_or_out, prefix=SMP, names=_smp_names,
           build_defaults=BuildDefaults(mean=IMAGENET_MEAN, std=IMAGENET_STD, needs_classes=True),
           describe=_describe_params, requires=("segmentation-models-pytorch", "timm", "huggingface-hub"),
           extra="smp"),
    Family("hf", ("hf",), build=_hf, logits=_hf_logits,
           build_defaults=BuildDefaults(mean=IMAGENET_MEAN, std=IMAGENET_STD, whole_image=True, needs_classes=True,
                                        read_weights=read_hf_folder),
           describe=_describe_hf, detect=is_hf_folder, requires=("transformers", "huggingface-hub"), extra="hf"),
    Family("monai", build=_monai, logits=_tensor_or_out, prefix=MONAI, names=_monai_names,
           build_defaults=BuildDefaults(needs_classes=True), describe=_describe_params, requires=("monai",),
           extra="monai"),
    Family("custom", ("custom",), build=_custom, logits=_tensor_or_out,
           build_defaults=BuildDefaults(needs_classes=True), describe=_describe_custom, runs_code=True),
    Family("torchscript", ("torchscript",), load=_load_torchscript, logits=_tensor_or_out,
           describe=_describe_file, detect=is_torchscript, weights_file=SCRIPT_FILE, runs_code=True),
    Family("export", ("export",), load=_load_exported, logits=_tensor_or_out,
           build_defaults=BuildDefaults(needs_classes=True, inspect_file=inspect_exported),
           describe=_describe_file, detect=is_exported_program, weights_file=EXPORT_FILE, runs_code=True),
)
_BY_ARCH: dict[str, Family] = {arch: family for family in FAMILIES for arch in family.archs}
_BY_PREFIX: dict[str, Family] = {family.prefix: family for family in FAMILIES if family.prefix}
assert len(_BY_ARCH) == sum(len(family.archs) for family in FAMILIES), "an arch name is claimed by two families"
assert not any(arch.startswith(prefix) for arch in _BY_ARCH for prefix in _BY_PREFIX), "a name has a family prefix"


def architectures() -> list[str]:
    """The arch names, a prefix family's as `PREFIX<name>` (without importing its library: `all_architectures`)."""
    return sorted([*_BY_ARCH, *(f"{prefix}<{family.name} architecture>" for prefix, family in _BY_PREFIX.items())])


def all_architectures() -> dict[str, list[str] | str]:
    """Every arch name by family, a prefix family's read from its library (or what to install for it)."""
    listed: dict[str, list[str] | str] = {}
    for family in FAMILIES:
        try:
            listed[family.name] = family.arch_names()
        except MissingDependencyError as exc:
            listed[family.name] = str(exc)
    return listed


def family_of(arch: str) -> Family:
    if arch in _BY_ARCH:
        return _BY_ARCH[arch]
    for prefix, family in _BY_PREFIX.items():
        if arch.startswith(prefix) and len(arch) > len(prefix):
            return family
    raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(architectures())} "
                     "(build_mar.sh --list-archs lists every one)")


def detect(path: Path) -> Family | None:
    """The family that claims a weights file (or folder) given without an architecture, if one does."""
    return next((family for family in FAMILIES if family.detect is not None and family.detect(path)), None)


def build_model(arch: str, channels: int, /, **params: Any) -> nn.Module:
    """Instantiate an architecture by name with random weights and `channels` output channels (its raw
    module, not adapted). Positional: a library's own `channels` keyword (MONAI's UNet) goes in params."""
    family = family_of(arch)
    if family.build is None:
        raise ValueError(f"{arch!r} models are loaded from their file, not built: use load_model")
    return family.build(arch, channels, **params)


def adapt(arch: str, model: nn.Module) -> nn.Module:
    """The model with its family's output adapter: its forward returns (N, C, H, W) logits."""
    logits = family_of(arch).logits
    return model if logits is None else LogitsOutput(model, logits)


def requirements(family: Family) -> dict[str, str]:
    """The installed versions of what the family imports, as the archive records them (handler.model.requires)."""
    found = {}
    for distribution in family.requires:
        try:
            found[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            raise MissingDependencyError(f"{family.name} models need {distribution}: install segserve's "
                                         f"{family.extra!r} extra ({install_hint(family.extra)})") from None
    return found


def check_requirements(config: ServingConfig) -> None:
    """Refuse to load a model whose recorded requirements are not installed, naming the extra that installs
    them; a different version is logged (the strict load says whether the weights still fit)."""
    family = family_of(config.arch)
    missing = []
    for distribution, version in config.requires.items():
        try:
            installed = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{distribution}=={version}")
            continue
        if installed != version:
            logger.warning("segserve: %s was built with %s==%s; this environment has %s", config.name,
                           distribution, version, installed)
    if missing:
        extra = family.extra or family.name
        raise MissingDependencyError(f"the model {config.name!r} ({family.name} family) needs "
                                     f"{', '.join(missing)}, which this environment lacks: install segserve's "
                                     f"{extra!r} extra ({install_hint(extra)})")


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
    check_requirements(config)
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
