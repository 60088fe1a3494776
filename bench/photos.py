"""Photo-like JPEGs for benchmarks, generated (no download, same bytes on every machine).

What a benchmark needs from a photo is its decode and encode cost: its size and its entropy. Camera
photos have a 1/f amplitude spectrum (smooth regions with fine texture and sharp edges); these images
are 1/f colour noise with overlaid objects and a sky gradient, saved as quality-90 JPEG, so a 1280x960
image is a few hundred kB, like a real one.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def _pink_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(height, width) noise with a 1/f amplitude spectrum, scaled to [-1, 1]."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    radius = np.sqrt(fx * fx + fy * fy)
    radius[0, 0] = 1.0
    spectrum = (rng.normal(size=radius.shape) + 1j * rng.normal(size=radius.shape)) / radius
    spectrum[0, 0] = 0
    noise = np.fft.irfft2(spectrum, s=(height, width))
    return noise / np.abs(noise).max()


# What the drawn objects are, as VOC class ids: the labels `photo_and_labels` returns.
ELLIPSE_CLASS, RECTANGLE_CLASS = 15, 7  # "person", "car"


def photo_and_labels(seed: int, size: tuple[int, int] = (1280, 960)) -> tuple[Image.Image, np.ndarray]:
    """An RGB (width, height) photo-like image, and its (height, width) uint8 labels: 0 for the
    background, ELLIPSE_CLASS and RECTANGLE_CLASS for the objects drawn on it."""
    width, height = size
    rng = np.random.default_rng(seed)
    base = rng.uniform(60, 200, size=3)
    sky = np.linspace(1.25, 0.75, height)[:, None, None]
    texture = np.stack([_pink_noise(rng, height, width) for _ in range(3)], axis=-1)
    pixels = np.clip(base * sky + 70 * texture, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    labels = Image.new("L", size, 0)
    draw, draw_labels = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    for _ in range(int(rng.integers(6, 14))):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(0.05, 0.35) * width, rng.uniform(0.05, 0.35) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        box = [x - w / 2, y - h / 2, x + w / 2, y + h / 2]
        if rng.random() < 0.5:
            draw.ellipse(box, fill=colour)
            draw_labels.ellipse(box, fill=ELLIPSE_CLASS)
        else:
            draw.rectangle(box, fill=colour)
            draw_labels.rectangle(box, fill=RECTANGLE_CLASS)
    # Objects get the scene's texture too, and edges a lens's softness.
    textured = np.asarray(image, dtype=np.float32) + 25 * texture[..., ::-1]
    image = Image.fromarray(np.clip(textured, 0, 255).astype(np.uint8), "RGB").filter(ImageFilter.GaussianBlur(0.8))
    return image, np.asarray(labels)


def photo(seed: int, size: tuple[int, int] = (1280, 960)) -> Image.Image:
    """An RGB (width, height) photo-like image."""
    return photo_and_labels(seed, size)[0]


def photo_jpeg(seed: int, size: tuple[int, int] = (1280, 960), quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    photo(seed, size).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
