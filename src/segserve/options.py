"""Per-request options: response format, class subset, minimum region area, tiling.

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
from .config import ServingConfig
from .errors import InvalidOption, shown

OPTION_NAMES = ("format", "classes", "min_area", "tile")
# Sliding-window inference (segserve.tiling): auto = only images over handler.tiling.auto_above_pixels.
TILE_MODES = ("auto", "on", "off")
# Inputs that carry the image rather than options.
IMAGE_FIELDS = ("body", "data", "file", "image")


@dataclass(frozen=True)
class Options:
    format: str = formats.DEFAULT  # a name in formats.REGISTRY
    classes: tuple[int, ...] | None = None  # None: all classes
    min_area: int = 0
    tile: str = "auto"


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
        fields.update({k: v for k, v in body.items() if k != "image"})
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
    return Options(format=_format(fields.get("format"), headers),
                   classes=parse_classes(fields.get("classes"), config),
                   min_area=_min_area(fields.get("min_area")),
                   tile=_tile(fields.get("tile")))


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


def _min_area(value: Any) -> int:
    if value is None or value == "":
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value) if value.bit_length() < 60 else ""
    else:
        text = value.strip() if isinstance(value, str) else ""
    if not (text.isascii() and text.isdigit() and len(text) <= 18):  # "²" and 5000 digits are no pixel counts
        raise InvalidOption(f"min_area must be a whole number of pixels >= 0, got {shown(value)}")
    return int(text)


def _tile(value: Any) -> str:
    if value is None or value == "":
        return "auto"
    mode = str(value).strip().lower()
    if mode not in TILE_MODES:
        raise InvalidOption(f"tile={shown(mode)} is not supported; use one of: {', '.join(TILE_MODES)}")
    return mode
