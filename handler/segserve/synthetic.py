"""Synthetic fluorescence-microscopy scenes for the default model: background / cell / nucleus.

The scene model, in the order it is drawn:

- Geometry. The microscope zoom varies per scene, so cells are roughly 8 to 45 px
  in radius in a 256 px image; their count follows the field of view (denser when
  zoomed out). Cells are irregular: a circle with smooth random radial bumps,
  stretched and rotated. Half of them grow in clusters next to an earlier cell, so
  cells touch and overlap; a later cell lies on top of the earlier ones. Each cell
  holds one nucleus (a smaller irregular outline, off-centre) that stays inside its
  cell with a rim of cytoplasm around it; an overlapping later cell may cover it.
- Fluorescence. Cytoplasm glows green, nuclei blue (with a little cross-talk
  between the channels). Brightness varies per cell, some cells close to the noise
  floor; both stains have fine and coarse texture.
- Optics and camera. A Gaussian point spread (sigma 0.7 to 1.5 px), uneven
  illumination (a tilt plus vignetting), per-scene gain and offset, then photon
  shot noise (variance proportional to the signal) and Gaussian read noise.

The label is the true geometry, before blur and noise: 0 background, 1 cell
(cytoplasm), 2 nucleus. There is no label noise.

Everything is drawn from `numpy.random.default_rng(seed)`: the same seed gives
the same image and mask. Training (seeds from 1,000,000), evaluation (seeds from
0), the tests and the README figures all draw their scenes from here.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageDraw

BACKGROUND, CELL, NUCLEUS = 0, 1, 2
CLASS_NAMES = ("background", "cell", "nucleus")


def _outline(rng: np.random.Generator, cx: float, cy: float, radius: float, points: int = 28,
             roughness: float = 0.18) -> tuple[np.ndarray, np.ndarray]:
    """A closed irregular outline (xs, ys): a circle with smooth random radial bumps, stretched and rotated.

    The outline is star-shaped around (cx, cy), so shrinking it towards the centre stays inside it.
    """
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    bumps = np.zeros(points)
    for k in (2, 3, 4, 5):
        bumps += rng.normal(0, roughness / k) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
    stretch = rng.uniform(0.75, 1.3)
    turn = rng.uniform(0, np.pi)
    r = radius * np.maximum(1 + bumps, 0.3)
    x, y = r * np.cos(angles) * stretch, r * np.sin(angles) / stretch
    return cx + x * np.cos(turn) - y * np.sin(turn), cy + x * np.sin(turn) + y * np.cos(turn)


def _fill(xs: np.ndarray, ys: np.ndarray, width: int, height: int) -> np.ndarray:
    """Rasterize a polygon into a (height, width) boolean array (coordinates already local)."""
    layer = Image.new("1", (width, height), 0)
    ImageDraw.Draw(layer).polygon(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=1)
    return np.asarray(layer, dtype=bool)


def _erode(mask: np.ndarray) -> np.ndarray:
    """One-pixel erosion (4-neighbourhood); beyond the array's edge the mask continues."""
    padded = np.pad(mask, 1, mode="edge")
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def _blur(plane: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float32 (H, W) plane: the microscope's point spread."""
    radius = max(1, int(3 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (x / np.float32(sigma)) ** 2)
    kernel /= kernel.sum()
    height, width = plane.shape
    padded = np.pad(plane, radius, mode="reflect")
    rows = kernel[0] * padded[0:height]
    for i in range(1, len(kernel)):
        rows += kernel[i] * padded[i:i + height]
    out = kernel[0] * rows[:, 0:width]
    for i in range(1, len(kernel)):
        out += kernel[i] * rows[:, i:i + width]
    return out


def _coarse_noise(rng: np.random.Generator, size: tuple[int, int], cell_px: int) -> np.ndarray:
    """Smooth float32 noise of unit-ish amplitude varying over about `cell_px` pixels (bicubic upsampling)."""
    height, width = size
    small = rng.standard_normal((height // cell_px + 2, width // cell_px + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(small, "F").resize((width, height), Image.Resampling.BICUBIC))


def generate_scene(seed: int, size: tuple[int, int] = (256, 256)) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image uint8 (H, W, 3) RGB, mask uint8 (H, W) with 0 background, 1 cell, 2 nucleus).

    `size` is (height, width). Cell sizes are in pixels, whatever the image size.
    """
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
    green = np.zeros(size, np.float32)  # cytoplasm stain
    blue = np.zeros(size, np.float32)  # nuclear stain
    for cx, cy in centers:  # later cells lie on top of earlier ones
        radius = mean_radius * rng.uniform(0.7, 1.3)
        xs, ys = _outline(rng, cx, cy, radius)
        offset = rng.uniform(-0.25, 0.25, 2) * radius
        nxs, nys = _outline(rng, cx + offset[0], cy + offset[1], radius * rng.uniform(0.28, 0.5),
                            points=18, roughness=0.1)
        cytoplasm_level, nucleus_level = rng.uniform(0.25, 1.0), rng.uniform(0.45, 1.0)
        # Draw in the cell's bounding box only (1 px margin), clipped to the image.
        x0, x1 = max(int(np.floor(xs.min())) - 1, 0), min(int(np.ceil(xs.max())) + 2, width)
        y0, y1 = max(int(np.floor(ys.min())) - 1, 0), min(int(np.ceil(ys.max())) + 2, height)
        if x1 <= x0 or y1 <= y0:
            continue
        box_w, box_h = x1 - x0, y1 - y0
        cell = _fill(xs - x0, ys - y0, box_w, box_h)
        # Nuclei stay inside a copy of the outline shrunk to 80%, and at least 1 px inside the cell:
        # a rim of cytoplasm always surrounds them.
        inner = _fill(cx - x0 + (xs - cx) * 0.8, cy - y0 + (ys - cy) * 0.8, box_w, box_h)
        nucleus = _fill(nxs - x0, nys - y0, box_w, box_h) & inner & _erode(cell)
        view = np.s_[y0:y1, x0:x1]
        label[view][cell] = CELL
        label[view][nucleus] = NUCLEUS
        green[view][cell] = cytoplasm_level
        blue[view][cell] = 0.0
        blue[view][nucleus] = nucleus_level

    # Stain texture: fine grain plus coarse patches.
    green *= 1 + 0.12 * rng.standard_normal(size, dtype=np.float32) + 0.12 * _coarse_noise(rng, size, 12)
    blue *= 1 + 0.08 * rng.standard_normal(size, dtype=np.float32) + 0.1 * _coarse_noise(rng, size, 6)
    sigma = rng.uniform(0.7, 1.5)
    green = _blur(green * np.float32(0.8), sigma)
    blue = _blur(blue * np.float32(0.9), sigma)
    rgb = np.stack([0.12 * green + 0.1 * blue, green + 0.12 * blue, blue + 0.08 * green], axis=-1)

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xx / max(width - 1, 1) - 0.5, yy / max(height - 1, 1) - 0.5
    tilt_x, tilt_y = rng.uniform(-0.45, 0.45, 2).tolist()
    illumination = 1 + tilt_x * u + tilt_y * v - rng.uniform(0.1, 0.5) * (u * u + v * v)
    gain, offset_level = rng.uniform(0.7, 1.2), rng.uniform(0.02, 0.08)
    rgb = rgb * (illumination * np.float32(gain))[..., None] + np.float32(offset_level)
    # Shot noise (Poisson, variance = signal / photons per unit) and the camera's Gaussian read noise.
    photons, read_noise = rng.uniform(150, 1500), rng.uniform(0.015, 0.05)
    noise_sd = np.sqrt(np.maximum(rgb, 0) / np.float32(photons) + np.float32(read_noise ** 2))
    rgb += noise_sd * rng.standard_normal(rgb.shape, dtype=np.float32)
    image = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
    return image, label


def generate_dataset(seeds: Iterable[int], size: tuple[int, int] = (256, 256)) -> tuple[np.ndarray, np.ndarray]:
    """Scenes for many seeds, stacked: (images uint8 (N, H, W, 3), masks uint8 (N, H, W))."""
    seeds = list(seeds)
    images = np.empty((len(seeds), *size, 3), np.uint8)
    masks = np.empty((len(seeds), *size), np.uint8)
    for i, seed in enumerate(seeds):
        images[i], masks[i] = generate_scene(seed, size)
    return images, masks
