"""The model's serving configuration: the `handler:` section of model-config.yaml.

One object carries the architecture, weights file, class names and palette,
input transform and request limits, so the handler, the trainer, the model card
and the tests never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    # Largest response the handler builds (format=probs grows with classes x pixels).
    max_response_bytes: int = 50_000_000


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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

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
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"model config not found: {path}")
        with path.open() as f:
            doc = yaml.safe_load(f) or {}
        return cls.from_dict(doc.get("handler", doc))

    @classmethod
    def from_dict(cls, section: dict[str, Any]) -> ServingConfig:
        """Build from the `handler:` section of model-config.yaml."""
        if not isinstance(section, dict):
            raise ConfigError("the `handler:` section of model-config.yaml must be a mapping")
        model = _section(section, "model")
        inp = _section(section, "input")
        limits = section.get("limits") or {}
        runtime = section.get("runtime") or {}
        tiling = section.get("tiling") or {}
        if not isinstance(tiling, dict):
            raise ConfigError("handler.tiling must be a mapping, e.g. {auto_above_pixels: 1048576, overlap: 0.25}")

        raw_classes = section.get("classes")
        if not isinstance(raw_classes, list) or len(raw_classes) < 2:
            raise ConfigError("handler.classes must list at least 2 classes, e.g. "
                              "[{name: background, color: [0, 0, 0]}, {name: cell, color: [0, 200, 0]}]")
        if len(raw_classes) > 256:
            raise ConfigError("handler.classes: at most 256 classes fit in an indexed PNG mask")
        classes = tuple(_class_info(i, c) for i, c in enumerate(raw_classes))

        size = inp.get("size")
        if isinstance(size, int):
            size = [size, size]
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
            raise ConfigError(f"handler.input.size must be [height, width] in pixels, got {size!r}")

        return cls(
            name=str(_required(model, "name", "handler.model")),
            version=str(model.get("version", "1.0")),
            arch=str(_required(model, "arch", "handler.model")),
            weights=str(_required(model, "weights", "handler.model")),
            arch_params=dict(model.get("arch_params") or {}),
            classes=classes,
            input_size=(size[0], size[1]),
            mean=_triple(inp.get("mean", [0.485, 0.456, 0.406]), "handler.input.mean"),
            std=_triple(inp.get("std", [0.229, 0.224, 0.225]), "handler.input.std", positive=True),
            limits=Limits(
                max_bytes=_positive_int(limits.get("max_bytes", Limits.max_bytes), "handler.limits.max_bytes"),
                max_pixels=_positive_int(limits.get("max_pixels", Limits.max_pixels), "handler.limits.max_pixels"),
                max_response_bytes=_positive_int(limits.get("max_response_bytes", Limits.max_response_bytes),
                                                 "handler.limits.max_response_bytes"),
            ),
            tiling=_tiling(tiling, (size[0], size[1])),
            threads=int(runtime.get("threads", 0) or 0),
            channels_last=_bool(runtime.get("channels_last", True), "handler.runtime.channels_last"),
            precision=_choice(runtime.get("precision", "auto"), PRECISIONS, "handler.runtime.precision"),
            decoder=_choice(runtime.get("decoder", "auto"), DECODERS, "handler.runtime.decoder"),
            compile=_bool(runtime.get("compile", False), "handler.runtime.compile"),
        )


PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DECODERS = ("auto", "pillow", "torchvision")


def _choice(value: Any, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{where} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def _tiling(section: dict, input_size: tuple[int, int]) -> Tiling:
    unknown = sorted(set(section) - {"auto_above_pixels", "tile_size", "overlap", "batch"})
    if unknown:
        raise ConfigError(f"handler.tiling.{unknown[0]} is not a setting; the settings are: "
                          "auto_above_pixels, tile_size, overlap, batch")
    size = section.get("tile_size") or list(input_size)
    if isinstance(size, int):
        size = [size, size]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise ConfigError(f"handler.tiling.tile_size must be [height, width] in pixels, got {size!r}")
    overlap = section.get("overlap", Tiling.overlap)
    if not (isinstance(overlap, (int, float)) and 0 <= overlap < 1):
        raise ConfigError(f"handler.tiling.overlap must be a fraction of the tile in [0, 1), e.g. 0.25, "
                          f"got {overlap!r}")
    return Tiling(
        auto_above_pixels=_positive_int(section.get("auto_above_pixels", Tiling.auto_above_pixels),
                                        "handler.tiling.auto_above_pixels"),
        tile_size=(size[0], size[1]),
        overlap=float(overlap),
        batch=_positive_int(section.get("batch", Tiling.batch), "handler.tiling.batch"),
    )


def _section(doc: dict, key: str) -> dict:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise ConfigError(f"model-config.yaml needs a `handler.{key}:` mapping")
    return value


def _required(doc: dict, key: str, where: str) -> Any:
    if doc.get(key) in (None, ""):
        raise ConfigError(f"model-config.yaml needs `{where}.{key}`")
    return doc[key]


def _class_info(index: int, raw: Any) -> ClassInfo:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or not raw.get("name"):
        raise ConfigError(f"handler.classes[{index}] needs a name, e.g. {{name: cell, color: [0, 200, 0]}}")
    color = raw.get("color", _default_color(index))
    if not (isinstance(color, (list, tuple)) and len(color) == 3 and all(0 <= int(v) <= 255 for v in color)):
        raise ConfigError(f"handler.classes[{index}].color must be [r, g, b] with values 0..255, got {color!r}")
    return ClassInfo(id=index, name=str(raw["name"]), color=(int(color[0]), int(color[1]), int(color[2])))


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
    if not (isinstance(value, (list, tuple)) and len(value) == 3):
        raise ConfigError(f"{where} must be three numbers (R, G, B), got {value!r}")
    out = tuple(float(v) for v in value)
    if positive and any(v <= 0 for v in out):
        raise ConfigError(f"{where} values must be > 0, got {value!r}")
    return out  # type: ignore[return-value]


def _positive_int(value: Any, where: str) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a positive integer, got {value!r}") from None
    if out <= 0:
        raise ConfigError(f"{where} must be a positive integer, got {value!r}")
    return out
