"""Synthetic fluorescence-microscopy scenes for the default model: background / cell / nucleus.

The scene model: a dark field holding irregular cells (smooth random outlines,
elongated and rotated), often in clusters so they touch and overlap; each cell
has a cytoplasm (green channel, textured, of varying brightness, some close to
the noise floor) and a nucleus (blue) that a later, overlapping cell can cover.
The microscope zoom varies per scene (cells of roughly 8 to 45 px radius in a
256 px image). The optics blur the image (Gaussian point spread), the
illumination is uneven (a tilt plus vignetting), then gain, offset and
Gaussian sensor noise are applied. The label is the true geometry before blur.

Everything is drawn from `numpy.random.default_rng(seed)`: the same seed gives
the same image and mask on every machine. Training, evaluation, tests, the
README figures and the benchmarks all draw their scenes from here.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

BACKGROUND, CELL, NUCLEUS = 0, 1, 2
CLASS_NAMES = ("background", "cell", "nucleus")


def _outline(rng: np.random.Generator, cx: float, cy: float, radius: float, points: int = 28,
             roughness: float = 0.18) -> list[tuple[float, float]]:
    """A closed irregular outline: a circle with smooth random radial bumps, stretched and rotated."""
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    bumps = np.zeros(points)
    for k in (2, 3, 4, 5):
        bumps += rng.normal(0, roughness / k) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
    stretch = rng.uniform(0.75, 1.3)
    turn = rng.uniform(0, np.pi)
    r = radius * (1 + bumps)
    x, y = r * np.cos(angles) * stretch, r * np.sin(angles) / stretch
    xs = cx + x * np.cos(turn) - y * np.sin(turn)
    ys = cy + x * np.sin(turn) + y * np.cos(turn)
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


def _blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, 3) float image: the microscope's point spread."""
    radius = max(1, int(3 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(rgb, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    height, width = rgb.shape[:2]
    rows = sum(kernel[i] * padded[i:i + height] for i in range(len(kernel)))
    return sum(kernel[i] * rows[:, i:i + width] for i in range(len(kernel)))


def _polygon_mask(size: tuple[int, int], outline: list[tuple[float, float]]) -> np.ndarray:
    layer = Image.new("1", (size[1], size[0]), 0)
    ImageDraw.Draw(layer).polygon(outline, fill=1)
    return np.asarray(layer, dtype=bool)


def _shrunk(outline: list[tuple[float, float]], cx: float, cy: float, factor: float) -> list[tuple[float, float]]:
    return [(cx + (x - cx) * factor, cy + (y - cy) * factor) for x, y in outline]


def generate_scene(seed: int, size: tuple[int, int] = (256, 256)) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image uint8 (H, W, 3) RGB, mask uint8 (H, W) with 0 background, 1 cell, 2 nucleus)."""
    rng = np.random.default_rng(seed)
    height, width = size
    zoom = rng.uniform(0.45, 1.7)
    mean_radius = 20.0 * zoom
    # Cell count scales with the field of view, denser when zoomed out.
    density = rng.uniform(0.6, 1.6) * (height * width) / (np.pi * mean_radius ** 2 * 4)
    count = max(1, int(round(density)))
    centers: list[tuple[float, float]] = []
    for _ in range(count):
        if centers and rng.random() < 0.5:  # grow a cluster: touching and overlapping neighbours
            px, py = centers[rng.integers(len(centers))]
            distance = mean_radius * rng.uniform(1.1, 2.0)
            angle = rng.uniform(0, 2 * np.pi)
            centers.append((px + distance * np.cos(angle), py + distance * np.sin(angle)))
        else:
            centers.append((rng.uniform(0, width), rng.uniform(0, height)))

    label = np.zeros(size, np.uint8)
    cytoplasm = np.zeros(size, np.float32)
    nuclei = np.zeros(size, np.float32)
    for cx, cy in centers:  # later cells lie on top of earlier ones
        radius = mean_radius * rng.uniform(0.6, 1.4)
        outline = _outline(rng, cx, cy, radius)
        cell = _polygon_mask(size, outline)
        # Nuclei stay inside this smaller copy of the outline: a rim of cytoplasm always surrounds them.
        inner = _polygon_mask(size, _shrunk(outline, cx, cy, 0.8))
        offset = rng.uniform(-0.25, 0.25, 2) * radius
        nucleus = _polygon_mask(size, _outline(rng, cx + offset[0], cy + offset[1], radius * rng.uniform(0.28, 0.5),
                                               points=18, roughness=0.1)) & inner
        label[cell] = CELL
        label[nucleus] = NUCLEUS
        cytoplasm[cell] = rng.uniform(0.3, 1.0)
        nuclei[cell] = 0.0
        nuclei[nucleus] = rng.uniform(0.45, 1.0)

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xx / max(width - 1, 1) - 0.5, yy / max(height - 1, 1) - 0.5
    tilt = rng.uniform(-0.45, 0.45, 2)
    illumination = 1 + tilt[0] * u + tilt[1] * v - rng.uniform(0.1, 0.5) * (u * u + v * v)
    texture = 1 + 0.18 * rng.standard_normal(size).astype(np.float32)
    green = cytoplasm * texture * 0.8
    blue = nuclei * 0.9
    rgb = np.stack([0.12 * green + 0.1 * blue, green + 0.12 * blue, blue + 0.08 * green], axis=-1)
    rgb = _blur(rgb * illumination[..., None], rng.uniform(0.7, 1.6))
    noise = rng.uniform(0.02, 0.07)
    rgb = rgb * rng.uniform(0.7, 1.2) + rng.uniform(0.02, 0.08) + noise * rng.standard_normal(rgb.shape)
    image = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
    return image, label
