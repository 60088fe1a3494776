"""Mask -> response bodies: indexed PNG, and the JSON summary with the PNG inside."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
from PIL import Image

from .config import ServingConfig

# zlib level for mask PNGs: masks are flat regions and compress well already at
# low levels, while higher levels cost several times the CPU for a few % bytes.
PNG_COMPRESS_LEVEL = 1


def mask_to_png(mask: np.ndarray, palette: list[int], compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """uint8 class-index mask (H, W) -> indexed ("P" mode) PNG bytes with the class palette.

    Viewers show the colours; numpy/Pillow read back the class ids unchanged.
    """
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"expected a uint8 (H, W) mask, got {mask.dtype} {mask.shape}")
    image = Image.fromarray(mask, mode="P")
    image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def class_summary(mask: np.ndarray, config: ServingConfig) -> list[dict]:
    """Per class: id, name, pixel count and fraction of the image."""
    counts = np.bincount(mask.ravel(), minlength=config.num_classes)
    total = int(mask.size)
    return [
        {"id": c.id, "name": c.name, "pixels": int(counts[c.id]), "fraction": round(int(counts[c.id]) / total, 6)}
        for c in config.classes
    ]


def json_response(mask: np.ndarray, config: ServingConfig) -> bytes:
    """The default response: model, size, per-class summary and the mask as base64 PNG."""
    height, width = mask.shape
    body = {
        "model": config.name,
        "version": config.version,
        "width": int(width),
        "height": int(height),
        "classes": class_summary(mask, config),
        "mask": base64.b64encode(mask_to_png(mask, config.palette)).decode("ascii"),
        "mask_format": "png;base64",
    }
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def overlay(image: Image.Image, mask: np.ndarray, config: ServingConfig, alpha: float = 0.45,
            legend: bool = True) -> Image.Image:
    """The input with the mask's class colours blended over it (background left clear) and a small legend."""
    from PIL import ImageDraw

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    colors = np.array([c.color for c in config.classes], dtype=np.float32)
    tinted = rgb * (1 - alpha) + colors[mask] * alpha
    out = np.where((mask > 0)[..., None], tinted, rgb)
    result = Image.fromarray(out.round().astype(np.uint8), "RGB")
    if legend:
        draw = ImageDraw.Draw(result)
        box = max(8, min(result.size) // 40)
        for row, c in enumerate(config.classes):
            top = 4 + row * (box + 4)
            draw.rectangle([4, top, 4 + box, top + box], fill=c.color, outline=(255, 255, 255))
            draw.text((8 + box, top - 1), c.name, fill=(255, 255, 255))
    return result
