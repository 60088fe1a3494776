"""Per-request options: response format, class subset, tiling, and the masks' post-processing.

Post-processing (segserve.masks: threshold, smooth, smooth_method, fill_holes, min_area) defaults to the
model config's `handler.postprocess:` section; a request's option overrides it.

Where options come from, first match wins:
1. fields of a JSON body (`{"image": "<base64>", "format": "rle"}`) or of a multipart form;
2. the URL path after the version: `/predictions/segmenter/1.0/rle` (format only);
3. the `Accept` header: the media types the formats claim (segserve.formats: `image/png`, `image/jpeg`,
   `application/x-npy`, `application/json`).
TorchServe drops URL query strings before the handler sees the request, so
`?format=png` cannot work; the client and the docs never use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import formats
from .config import FILE_WINDOW, MAX_SMOOTH_RADIUS, SMOOTH_METHODS, ServingConfig, Window
from .errors import InvalidOption, shown
from .masks import PostProcess

POSTPROCESS_OPTIONS = ("threshold", "smooth", "smooth_method", "fill_holes", "min_area")
# window and axis: DICOM and NIfTI input only (segserve.medical).
MEDICAL_OPTIONS = ("window", "axis")
OPTION_NAMES = ("format", "classes", "tile", *POSTPROCESS_OPTIONS, "instance_mask", *MEDICAL_OPTIONS)
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")
# Sliding-window inference (segserve.tiling): auto = only images over handler.tiling.auto_above_pixels.
TILE_MODES = ("auto", "on", "off")
# Inputs that carry the image rather than options.
IMAGE_FIELDS = ("body", "data", "file", "image")
# The keys of a JSON body that carry the base64 image: segserve's "image", and "data", TorchServe's own
# handlers' convention ({"data": "<base64>"}).
JSON_IMAGE_KEYS = ("image", "data")


@dataclass(frozen=True)
class Options:
    format: str = formats.DEFAULT  # a name in formats.REGISTRY
    classes: tuple[int, ...] | None = None  # None: all classes
    tile: str = "auto"
    post: PostProcess = PostProcess()
    instance_mask: bool = False  # format=instances: add the uint16 instance-id PNG
    window: str | Window = FILE_WINDOW  # DICOM/NIfTI: "file" or a Window (a preset's already looked up)
    axis: int = 2  # NIfTI: the axis a volume is cut along into slices
    given: tuple[str, ...] = ()  # the options the request set (not empty), in OPTION_NAMES order

    @property
    def medical_given(self) -> tuple[str, ...]:
        """Which of window and axis the request set (refused for other input)."""
        return tuple(key for key in MEDICAL_OPTIONS if key in self.given)


def request_header(headers: dict[str, Any], name: str) -> str | None:
    """A request header by case-insensitive name (TorchServe keeps the client's spelling)."""
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name and isinstance(value, str):
            return value
    return None


def raw_options(inputs: dict[str, Any]) -> dict[str, Any]:
    """Option fields from a JSON body or multipart form, with bytes decoded to text."""
    fields: dict[str, Any] = {}
    body = inputs.get("body")
    if isinstance(body, dict):
        fields.update({k: v for k, v in body.items() if k not in JSON_IMAGE_KEYS})
    for key, value in inputs.items():
        if key in IMAGE_FIELDS:
            continue
        fields[key] = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value
    return fields


def parse_options(inputs: dict[str, Any], headers: dict[str, Any], config: ServingConfig) -> Options:
    fields = raw_options(inputs)
    unknown = sorted(set(fields) - set(OPTION_NAMES))
    if unknown:
        raise InvalidOption(f"unknown option {shown(unknown[0])}; the options are: {', '.join(OPTION_NAMES)}")
    name = _format(fields.get("format"), headers)
    given = tuple(key for key in OPTION_NAMES if fields.get(key) not in (None, ""))
    asked = [key for key in POSTPROCESS_OPTIONS if key in given]
    if asked and formats.get(name).needs_probs:
        raise InvalidOption(f"{', '.join(asked)} shape masks, and format={name} answers probabilities: drop them or "
                            "ask for a mask format")
    return Options(format=name, classes=parse_classes(fields.get("classes"), config), tile=_tile(fields.get("tile")),
                   post=parse_postprocess(fields, config),
                   instance_mask=_flag(fields.get("instance_mask"), "instance_mask"),
                   window=parse_window(fields.get("window"), config), axis=_axis(fields.get("axis"), config),
                   given=given)


def parse_window(value: Any, config: ServingConfig) -> str | Window:
    """window=file, a preset's name, or "center,width" -> "file" or a Window; the model config's when unset."""
    medical = config.medical
    chosen = medical.window if value in (None, "") else str(value).strip()
    if not isinstance(chosen, str):
        return chosen
    if chosen == FILE_WINDOW:
        return FILE_WINDOW
    if chosen in medical.presets:
        return medical.presets[chosen]
    parts = chosen.split(",")
    try:
        center, width = (float(part) for part in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        center = width = None
    if center is None or not (abs(center) < 1e9 and 1 <= width < 1e9):  # NaN fails both
        presets = f"; this model's presets: {', '.join(medical.presets)}" if medical.presets else ""
        raise InvalidOption(f"window must be 'center,width' in the image's units (e.g. window=40,400 for a CT soft "
                            f"tissue window, width >= 1), {FILE_WINDOW!r} for the file's own{presets}; got "
                            f"{shown(value)}")
    return Window(center, width)


def _axis(value: Any, config: ServingConfig) -> int:
    if value is None or value == "":
        return config.medical.slice_axis
    text = str(value).strip()
    if text not in ("0", "1", "2"):
        raise InvalidOption(f"axis must be 0, 1 or 2 (the NIfTI volume's i, j or k axis to cut slices along), "
                            f"got {shown(value)}")
    return int(text)


def parse_postprocess(fields: dict[str, Any], config: ServingConfig) -> PostProcess:
    """The post-processing options of a request, the model config's defaults where it sets none."""
    defaults = config.postprocess
    threshold = fields.get("threshold")
    return PostProcess(
        threshold=defaults.threshold if threshold in (None, "") else _number(threshold, "threshold", 0.0, 1.0),
        smooth=_whole(fields.get("smooth"), "smooth", defaults.smooth, MAX_SMOOTH_RADIUS),
        smooth_method=_smooth_method(fields.get("smooth_method"), defaults.smooth_method),
        fill_holes=_flag(fields.get("fill_holes"), "fill_holes", defaults.fill_holes),
        min_area=_whole(fields.get("min_area"), "min_area", defaults.min_area))


def _format(value: Any, headers: dict[str, Any]) -> str:
    if value is None:
        value = request_header(headers, "url_path") or None
    if value is not None:
        name = str(value).strip().lower()
        if name not in formats.REGISTRY:
            raise InvalidOption(f"format={shown(name)} is not supported; use one of: {', '.join(formats.REGISTRY)}")
        return name
    negotiated = formats.for_accept(request_header(headers, "accept") or "")
    return negotiated.name if negotiated is not None else formats.DEFAULT


def parse_classes(value: Any, config: ServingConfig) -> tuple[int, ...] | None:
    if value is None or value == "":
        return None
    items = value if isinstance(value, list) else str(value).split(",")
    by_name = {c.name: c.id for c in config.classes}
    ids = []
    for item in items:
        item = str(item).strip()
        if item in by_name:
            ids.append(by_name[item])
        elif item.isascii() and item.isdigit() and len(item) <= 3 and int(item) < config.num_classes:
            # ASCII digits only (str.isdigit takes "²", which int() refuses); at most 256 classes
            ids.append(int(item))
        else:
            raise InvalidOption(f"classes: {shown(item)} is not a class of this model; use names or ids from: "
                                + ", ".join(f"{c.id}={c.name}" for c in config.classes))
    return tuple(sorted(set(ids)))


def _whole(value: Any, name: str, default: int, maximum: int | None = None) -> int:
    """A whole number of pixels in [0, maximum]; ASCII digits only (int() also reads other scripts' digits)."""
    if value is None or value == "":
        return default
    text = str(value).strip()
    span = f"0..{maximum}" if maximum is not None else ">= 0"
    if isinstance(value, bool) or not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise InvalidOption(f"{name} must be a whole number of pixels, {span}, got {shown(value)}")
    number = int(text)
    if maximum is not None and number > maximum:
        raise InvalidOption(f"{name} must be a whole number of pixels, {span}, got {number}")
    return number


def _number(value: Any, name: str, low: float, high: float) -> float:
    try:
        number = float(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or not low <= number <= high:  # NaN fails both comparisons
        raise InvalidOption(f"{name} must be a number in [{low:g}, {high:g}], got {shown(value)}")
    return number


def _flag(value: Any, name: str, default: bool = False) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE or text in FALSE:
        return text in TRUE if text else default
    raise InvalidOption(f"{name} must be true or false, got {shown(value)}")


def _smooth_method(value: Any, default: str) -> str:
    if value is None or value == "":
        return default
    method = str(value).strip().lower()
    if method not in SMOOTH_METHODS:
        raise InvalidOption(f"smooth_method={shown(method)} is not supported; use one of: {', '.join(SMOOTH_METHODS)}")
    return method


def _tile(value: Any) -> str:
    if value is None or value == "":
        return "auto"
    mode = str(value).strip().lower()
    if mode not in TILE_MODES:
        raise InvalidOption(f"tile={shown(mode)} is not supported; use one of: {', '.join(TILE_MODES)}")
    return mode
