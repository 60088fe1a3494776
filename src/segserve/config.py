"""The model's serving configuration: the `handler:` section of model-config.yaml.

One object carries the architecture, weights file, class names and palette,
input transform and request limits, so the handler, the trainer, the model card
and the tests never disagree.

The loader is strict: a key that is not a setting (a typo such as `max_pixel`)
or a value of the wrong type is refused with its full dotted path, the closest
valid key and the expected type, never silently ignored or half-converted.
Only `handler.model.arch_params` is free-form: it is the architecture's kwargs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """model-config.yaml is missing a key or has a bad value."""


@dataclass(frozen=True)
class ClassInfo:
    id: int
    name: str
    color: tuple[int, int, int]
    # A DICOM SEG's coded concepts for the class (segserve.medical), each (code value, coding scheme, meaning):
    # its segmented property type and category. None: the class's name in a local scheme; Anatomical Structure.
    code: tuple[str, str, str] | None = None
    category: tuple[str, str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The class as model-config.yaml lists it (what a build copies into the archive's config)."""
        extra = {key: list(value) for key, value in (("code", self.code), ("category", self.category)) if value}
        return {"name": self.name, "color": list(self.color), **extra}

    @property
    def segment_code(self) -> SegmentCode:
        return SegmentCode(self.category or ANATOMICAL_STRUCTURE, self.code or (self.name, LOCAL_SCHEME, self.name))


# Input formats read by default, by Pillow's names (handler.limits.formats).
INPUT_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")


@dataclass(frozen=True)
class Limits:
    """What one request may cost, the `handler.limits:` section (docs/resilience.md has the measured cost of each
    unit). Everything over a limit is refused with its own 4xx naming it, before the work where it can be known."""

    max_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    # Largest response the handler builds, whatever the format; keep it below config.properties'
    # max_response_size (a larger answer makes TorchServe's frontend drop the worker and its batch).
    max_response_bytes: int = 50_000_000
    # Input formats read, recognised from their first bytes before any decoder runs; others are a 415.
    formats: tuple[str, ...] = INPUT_FORMATS
    # Decoder work that pixels do not bound: the scans of a progressive JPEG, the strips or tiles of a TIFF.
    max_jpeg_scans: int = 50
    max_tiff_strips: int = 50_000
    # Sliding windows of one tiled request (a 40 Mpx image of any shape up to 100:1 needs at most ~1,300).
    max_windows: int = 1_500
    # format=polygons: rings (outlines and holes) traced per request, counted before tracing (tracing time grows
    # faster than their number), and vertices answered.
    max_polygon_rings: int = 50_000
    max_polygon_vertices: int = 1_000_000
    # One request's estimated peak memory (pixels x bytes per pixel of its path and format), bytes.
    max_request_memory: int = 1_000_000_000
    # Fields of a form or JSON body besides the image, and the bytes of one option's value.
    max_fields: int = 16
    max_option_bytes: int = 1_000
    # Frames of one multi-frame DICOM or slices of one NIfTI volume (each is a model input), read from the header.
    max_frames: int = 512
    # Images of one KServe v1 request ({"instances": [...]}), each segmented as a request of its own in the batch.
    max_v1_instances: int = 16


@dataclass(frozen=True)
class Tiling:
    """Sliding-window inference for large images (segserve.tiling), the `handler.tiling:` section."""

    # tile=auto tiles images with more pixels than this (and larger than one tile); smaller ones are resized.
    auto_above_pixels: int = 1_048_576
    # Window (height, width) cut from the image at its own scale; None = the model's input size.
    tile_size: tuple[int, int] | None = None
    # Fraction of a window shared with its neighbour, in [0, 1).
    overlap: float = 0.25
    # Windows per forward pass.
    batch: int = 4


@dataclass(frozen=True)
class PostProcessDefaults:
    """The `handler.postprocess:` section: what a request gets unless it sets the option itself."""

    # Sigmoid heads: the probability cut (None = 0.5). Softmax: pixels whose top probability is below it
    # become `ignore_label` (None = plain argmax).
    threshold: float | None = None
    smooth: int = 0  # radius in pixels
    smooth_method: str = "median"  # median, open or close (segserve.masks)
    fill_holes: bool = False
    min_area: int = 0
    ignore_label: int = 0  # the class id (0..255) a softmax pixel under the threshold becomes


@dataclass(frozen=True)
class Window:
    """A VOI window (DICOM's window center and width, in modality units such as HU): what maps to 0..255."""

    center: float
    width: float


@dataclass(frozen=True)
class SegmentCode:
    """A class's coded concepts in a DICOM SEG: (code value, coding scheme, meaning) each."""

    category: tuple[str, str, str]
    type: tuple[str, str, str]


# A SEG segment's default category, and the local coding scheme its default type is named in (the class name).
ANATOMICAL_STRUCTURE = ("91723000", "SCT", "Anatomical Structure")
LOCAL_SCHEME = "99SEGSERVE"
FILE_WINDOW = "file"


@dataclass(frozen=True)
class Medical:
    """The `handler.medical:` section (segserve.medical, docs/medical.md): how DICOM and NIfTI input becomes the
    8-bit image the model was trained on, and how the classes are coded in a DICOM SEG."""

    # The VOI window: "file" (the file's own window center and width; NIfTI: cal_min and cal_max; else the
    # frame's own range), a preset's name, or [center, width]. A request's `window` option overrides it.
    window: str | Window = FILE_WINDOW
    presets: dict[str, Window] = field(default_factory=dict)
    # The NIfTI axis (0, 1, 2) a volume is cut along into the 2-D slices the model segments (request: axis=...).
    slice_axis: int = 2


HEADS = ("softmax", "binary", "multilabel")  # segserve.heads
SMOOTH_METHODS = ("median", "open", "close")  # segserve.masks
MAX_SMOOTH_RADIUS = 50
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DECODERS = ("auto", "pillow", "torchvision")

# The keys each part of the `handler:` section may hold (arch_params is free-form: the architecture's kwargs).
HANDLER_KEYS = ("model", "classes", "input", "limits", "tiling", "postprocess", "runtime", "medical")
MODEL_KEYS = ("name", "version", "arch", "arch_params", "weights", "head", "requires")
CLASS_KEYS = ("name", "color", "code", "category")
INPUT_KEYS = ("size", "mean", "std")
LIMITS_KEYS = tuple(f.name for f in fields(Limits))
TILING_KEYS = tuple(f.name for f in fields(Tiling))
POSTPROCESS_KEYS = tuple(f.name for f in fields(PostProcessDefaults))
RUNTIME_KEYS = ("threads", "channels_last", "precision", "decoder", "compile")
MEDICAL_KEYS = tuple(f.name for f in fields(Medical))



@dataclass(frozen=True)
class ServingConfig:
    name: str
    version: str
    arch: str
    weights: str
    classes: tuple[ClassInfo, ...]
    input_size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    arch_params: dict[str, Any] = field(default_factory=dict)
    # How output channels become masks (segserve.heads): softmax (a channel per class), binary (one sigmoid
    # channel; classes = background + the class) or multilabel (a sigmoid channel per class after background).
    head: str = "softmax"
    postprocess: PostProcessDefaults = PostProcessDefaults()
    # The distributions the model's family imports and the versions it was built with ({name: version}).
    requires: dict[str, str] = field(default_factory=dict)
    limits: Limits = Limits()
    tiling: Tiling = Tiling()
    threads: int = 0
    # Run the model on channels-last tensors (NHWC): oneDNN's and cuDNN's fast convolution layout.
    channels_last: bool = True
    # Forward-pass precision: auto = float16 autocast on CUDA, float32 on CPU (CPUs without bf16
    # units run half precision slower than float32).
    precision: str = "auto"
    # Who decodes JPEGs for the model: auto = torchvision on the GPU (nvJPEG, one call per batch) when
    # the worker has one, else Pillow; pillow or torchvision to force one (torchvision also runs on CPU).
    decoder: str = "auto"
    # torch.compile the model at load (slower start, faster forwards on GPU); off by default.
    compile: bool = False
    medical: Medical = Medical()
    # A 3-D model's sliding-window ROI (D, H, W) along a NIfTI volume's i, j, k axes (input.size: [D, H, W],
    # arch_params.spatial_dims: 3); None for 2-D models. input_size is then its (H, W).
    volume_roi: tuple[int, int, int] | None = None

    @property
    def spatial_size(self) -> tuple[int, ...]:
        """input.size as written: the model input's (H, W), or a 3-D model's window (D, H, W)."""
        return self.volume_roi or self.input_size

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One model input's (channels, *spatial) shape: (3, H, W), or a 3-D model's (in_channels, D, H, W)."""
        return input_shape(self.spatial_size, self.arch_params)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def out_channels(self) -> int:
        """The model's output channels: a class each for softmax; sigmoid heads have none for the background."""
        from .heads import get  # torch: only where a model is run

        return get(self.head).channels(self.num_classes)

    @property
    def family(self) -> str:
        """The model family's name (segserve.families), as describe and the JSON answers show it."""
        from .families import family_of

        return family_of(self.arch).name

    @property
    def tile_size(self) -> tuple[int, int]:
        """(height, width) of the sliding windows: handler.tiling.tile_size, else the model's input size."""
        return self.tiling.tile_size or self.input_size

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def palette(self) -> list[int]:
        """Flat RGB palette for an indexed PNG, padded to 256 entries."""
        flat = [v for c in self.classes for v in c.color]
        return flat + [0] * (768 - len(flat))

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServingConfig:
        """Read the `handler:` section of a model-config.yaml (or a file holding only that section)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"model config not found: {path}")
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{path} must be a mapping of settings, got {type(doc).__name__}")
        if "handler" not in doc and "model" not in doc:
            raise ConfigError(f"{path} has no `handler:` section (segserve reads its settings from there)")
        return cls.from_dict(doc.get("handler", doc))

    @classmethod
    def from_dict(cls, section: dict[str, Any]) -> ServingConfig:
        """Build from the `handler:` section of model-config.yaml."""
        if not isinstance(section, dict):
            raise ConfigError("the `handler:` section of model-config.yaml must be a mapping")
        check_keys(section, HANDLER_KEYS, "handler")
        model = _section(section, "model", MODEL_KEYS, required=True)
        inp = _section(section, "input", INPUT_KEYS, required=True)
        limits = _section(section, "limits", LIMITS_KEYS)
        runtime = _section(section, "runtime", RUNTIME_KEYS)
        tiling = _section(section, "tiling", TILING_KEYS)
        postprocess = _section(section, "postprocess", POSTPROCESS_KEYS)
        medical = _section(section, "medical", MEDICAL_KEYS)

        raw_classes = section.get("classes")
        if not isinstance(raw_classes, list) or len(raw_classes) < 2:
            raise ConfigError("handler.classes must list at least 2 classes, e.g. "
                              "[{name: background, color: [0, 0, 0]}, {name: cell, color: [0, 200, 0]}]")
        if len(raw_classes) > 256:
            raise ConfigError("handler.classes: at most 256 classes fit in an indexed PNG mask")
        classes = tuple(_class_info(i, c) for i, c in enumerate(raw_classes))
        size = inp.get("size")
        volume_roi = _size3(size) if isinstance(size, (list, tuple)) and len(size) == 3 else None
        input_size = volume_roi[1:] if volume_roi else _size(size, "handler.input.size")
        arch_params = model.get("arch_params")
        if arch_params is not None and not isinstance(arch_params, dict):
            raise ConfigError(f"handler.model.arch_params must be a mapping of the architecture's keyword "
                              f"arguments, got {arch_params!r}")
        spatial_dims = (arch_params or {}).get("spatial_dims", 2)
        if (volume_roi is not None) != (spatial_dims == 3):
            raise ConfigError(f"handler.input.size {size!r} and arch_params.spatial_dims {spatial_dims!r} disagree: a "
                              "3-D model (spatial_dims: 3) takes its sliding window's [depth, height, width] as "
                              "input.size, a 2-D one [height, width]")

        return cls(
            name=_text(_required(model, "name", "handler.model"), "handler.model.name"),
            version=_text(model.get("version", "1.0"), "handler.model.version"),
            arch=_text(_required(model, "arch", "handler.model"), "handler.model.arch"),
            weights=_text(_required(model, "weights", "handler.model"), "handler.model.weights"),
            arch_params=dict(arch_params or {}),
            head=choice(model.get("head", "softmax"), HEADS, "handler.model.head"),
            postprocess=_postprocess(postprocess),
            requires=_requires(model.get("requires")),
            classes=classes,
            input_size=input_size,
            mean=_triple(inp.get("mean", [0.485, 0.456, 0.406]), "handler.input.mean"),
            std=_triple(inp.get("std", [0.229, 0.224, 0.225]), "handler.input.std", positive=True),
            limits=_limits(limits),
            tiling=_tiling(tiling, input_size),
            threads=whole_number(runtime.get("threads", 0), "handler.runtime.threads", 0),
            channels_last=boolean(runtime.get("channels_last", True), "handler.runtime.channels_last"),
            precision=choice(runtime.get("precision", "auto"), PRECISIONS, "handler.runtime.precision"),
            decoder=choice(runtime.get("decoder", "auto"), DECODERS, "handler.runtime.decoder"),
            compile=boolean(runtime.get("compile", False), "handler.runtime.compile"),
            medical=_medical(medical),
            volume_roi=volume_roi,
        )


# -- strict checks, shared with the build's check of TorchServe's own keys ----------------------------------
def unknown_key(key: Any, allowed: Iterable[str], where: str = "", what: str = "a setting") -> str:
    """The message for a key that is not allowed: its dotted path, the closest valid key, the valid keys."""
    import difflib  # only on the error path: keeps it out of every worker's start

    allowed = list(allowed)
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"; did you mean {_join(where, close[0])}?" if close else ""
    return f"{_join(where, key)} is not {what}{hint} (valid keys: {', '.join(allowed)})"


def check_keys(section: dict, allowed: Iterable[str], where: str = "", what: str = "a setting") -> None:
    """Refuse the first key of `section` that is not in `allowed`."""
    allowed = tuple(allowed)
    for key in section:
        if key not in allowed:
            raise ConfigError(unknown_key(key, allowed, where, what))


def whole_number(value: Any, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where} must be a whole number >= {minimum}, got {value!r}")
    return value


def boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def choice(value: Any, allowed: Iterable[str], where: str) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{where} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _section(doc: dict, key: str, allowed: tuple[str, ...], required: bool = False) -> dict:
    value = doc.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        if value is None:
            raise ConfigError(f"model-config.yaml needs a `handler.{key}:` mapping")
        raise ConfigError(f"handler.{key} must be a mapping of settings ({', '.join(allowed)}), got {value!r}")
    check_keys(value, allowed, f"handler.{key}")
    return value


def _required(doc: dict, key: str, where: str) -> Any:
    if doc.get(key) in (None, ""):
        raise ConfigError(f"model-config.yaml needs `{where}.{key}`")
    return doc[key]


def _text(value: Any, where: str) -> str:
    """A name: text (a bare number such as `version: 2` is read as its text)."""
    if isinstance(value, str) or _is_number(value):
        return str(value)
    raise ConfigError(f"{where} must be text, got {value!r}")


def _size(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in value)):
        raise ConfigError(f"{where} must be [height, width] in pixels (or one number for a square), got {value!r}")
    return value[0], value[1]


def _size3(value: Any) -> tuple[int, int, int]:
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in value):
        raise ConfigError(f"handler.input.size of a 3-D model must be [depth, height, width] in voxels, got {value!r}")
    return value[0], value[1], value[2]


def input_shape(size: Any, arch_params: dict[str, Any]) -> tuple[int, ...]:
    """A model input's (channels, *spatial) shape for an input size of 2 (RGB images) or 3 entries (volumes: one
    channel, or arch_params.in_channels, each the same windowed volume)."""
    size = tuple(size)
    if len(size) == 3:
        return (int(arch_params.get("in_channels", 1)), *size)
    return (3, *size)


def _requires(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not (isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
        raise ConfigError(f"handler.model.requires must map package names to versions, e.g. "
                          f"{{segmentation-models-pytorch: '0.6.0'}}, got {value!r}")
    return dict(value)


def _limits(section: dict) -> Limits:
    values: dict[str, Any] = {key: whole_number(section.get(key, getattr(Limits, key)), f"handler.limits.{key}", 1)
                              for key in LIMITS_KEYS if key != "formats"}
    values["formats"] = input_formats(section.get("formats", list(Limits.formats)), "handler.limits.formats")
    return Limits(**values)


def input_formats(value: Any, where: str) -> tuple[str, ...]:
    """Names of image formats Pillow reads and recognises from their first bytes (the allow-list is checked
    from them before any decoder runs), upper-cased: [JPEG, PNG]."""
    from PIL import Image  # only here: the rest of the config needs no imaging library

    Image.init()
    known = sorted(name for name, (_, accept) in Image.OPEN.items() if accept is not None)
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        raise ConfigError(f"{where} must be a list of image format names, e.g. [JPEG, PNG], got {value!r}")
    names = tuple(dict.fromkeys(v.strip().upper() for v in value))
    for name in names:
        if name not in known:
            raise ConfigError(f"{where}: {name!r} is not an image format Pillow recognises from its first bytes; "
                              f"use some of: {', '.join(known)}")
    return names


def _tiling(section: dict, input_size: tuple[int, int]) -> Tiling:
    size = section.get("tile_size")
    overlap = section.get("overlap", Tiling.overlap)
    if not (_is_number(overlap) and 0 <= overlap < 1):
        raise ConfigError(f"handler.tiling.overlap must be a fraction of the tile in [0, 1), e.g. 0.25, "
                          f"got {overlap!r}")
    return Tiling(
        auto_above_pixels=whole_number(section.get("auto_above_pixels", Tiling.auto_above_pixels),
                                       "handler.tiling.auto_above_pixels", 1),
        tile_size=input_size if size is None else _size(size, "handler.tiling.tile_size"),
        overlap=float(overlap),
        batch=whole_number(section.get("batch", Tiling.batch), "handler.tiling.batch", 1),
    )


def _postprocess(section: dict) -> PostProcessDefaults:
    threshold = section.get("threshold")
    if threshold is not None and not (_is_number(threshold) and 0 <= threshold <= 1):
        raise ConfigError(f"handler.postprocess.threshold must be a probability in [0, 1] (or null), got {threshold!r}")
    smooth = whole_number(section.get("smooth", 0), "handler.postprocess.smooth", 0)
    if smooth > MAX_SMOOTH_RADIUS:
        raise ConfigError(f"handler.postprocess.smooth is a radius in pixels, 0..{MAX_SMOOTH_RADIUS}, got {smooth}")
    ignore = whole_number(section.get("ignore_label", 0), "handler.postprocess.ignore_label", 0)
    if ignore > 255:
        raise ConfigError(f"handler.postprocess.ignore_label must be a class id 0..255 (a PNG mask value), "
                          f"got {ignore}")
    return PostProcessDefaults(
        threshold=None if threshold is None else float(threshold), smooth=smooth,
        smooth_method=choice(section.get("smooth_method", "median"), SMOOTH_METHODS,
                             "handler.postprocess.smooth_method"),
        fill_holes=boolean(section.get("fill_holes", False), "handler.postprocess.fill_holes"),
        min_area=whole_number(section.get("min_area", 0), "handler.postprocess.min_area", 0),
        ignore_label=ignore)


def window(value: Any, where: str) -> Window:
    """[center, width] (width >= 1, as DICOM's VOI window) -> Window."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)
            and value[1] >= 1):
        raise ConfigError(f"{where} must be [center, width] in the image's units (e.g. HU: [40, 400]), width >= 1, "
                          f"got {value!r}")
    return Window(float(value[0]), float(value[1]))


def _medical(section: dict) -> Medical:
    raw_presets = section.get("presets") or {}
    if not isinstance(raw_presets, dict):
        raise ConfigError(f"handler.medical.presets must map names to [center, width], e.g. {{brain: [40, 80]}}, "
                          f"got {raw_presets!r}")
    presets = {str(name): window(value, f"handler.medical.presets.{name}") for name, value in raw_presets.items()}
    chosen = section.get("window", FILE_WINDOW)
    if isinstance(chosen, str):
        if chosen != FILE_WINDOW and chosen not in presets:
            raise ConfigError(f"handler.medical.window must be {FILE_WINDOW!r}, a preset's name "
                              f"({', '.join(presets) or 'none set in handler.medical.presets'}) or [center, width], "
                              f"got {chosen!r}")
    else:
        chosen = window(chosen, "handler.medical.window")
    axis = whole_number(section.get("slice_axis", 2), "handler.medical.slice_axis", 0)
    if axis > 2:
        raise ConfigError(f"handler.medical.slice_axis must be 0, 1 or 2 (a NIfTI volume's i, j, k), got {axis}")
    return Medical(window=chosen, presets=presets, slice_axis=axis)


def _code(value: Any, where: str) -> tuple[str, str, str]:
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (str, int)) for v in value)
            and all(str(v) for v in value)):
        raise ConfigError(f"{where} must be [code value, coding scheme, meaning], e.g. [4421005, SCT, Cell], "
                          f"got {value!r}")
    return str(value[0]), str(value[1]), str(value[2])


def _class_info(index: int, raw: Any) -> ClassInfo:
    where = f"handler.classes[{index}]"
    if isinstance(raw, str):
        raw = {"name": raw}
    if isinstance(raw, dict):
        check_keys(raw, CLASS_KEYS, where)
    if not isinstance(raw, dict) or not raw.get("name"):
        raise ConfigError(f"{where} needs a name, e.g. {{name: cell, color: [0, 200, 0]}}")
    color = raw.get("color", _default_color(index))
    if not (isinstance(color, (list, tuple)) and len(color) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in color)):
        raise ConfigError(f"{where}.color must be [r, g, b], whole numbers 0..255, got {color!r}")
    code, category = (None if raw.get(key) is None else _code(raw[key], f"{where}.{key}")
                      for key in ("code", "category"))
    return ClassInfo(id=index, name=_text(raw["name"], f"{where}.name"), color=(color[0], color[1], color[2]),
                     code=code, category=category)


def _default_color(index: int) -> list[int]:
    # PASCAL VOC's bit-interleaved palette: distinct colours for any class count.
    r = g = b = 0
    c = index
    for shift in range(7, -1, -1):
        r |= ((c >> 0) & 1) << shift
        g |= ((c >> 1) & 1) << shift
        b |= ((c >> 2) & 1) << shift
        c >>= 3
    return [r, g, b]


def _triple(value: Any, where: str, positive: bool = False) -> tuple[float, float, float]:
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_number(v) for v in value)):
        raise ConfigError(f"{where} must be three numbers (R, G, B), got {value!r}")
    if positive and any(v <= 0 for v in value):
        raise ConfigError(f"{where} values must be > 0, got {value!r}")
    return float(value[0]), float(value[1]), float(value[2])
