"""Sliding-window inference for large images: overlapping tiles at the image's own scale, blended.

Like MONAI's `sliding_window_inference`: windows of the model's input size are cut
from the image without resizing, run through the model `batch` at a time, and
their logits are averaged with a Gaussian weight that fades towards each window's
edge, where a convolutional model sees the least context; so no seams.

Memory stays bounded by the output, not by classes x area: windows are processed
one row of windows at a time, weighted logits are accumulated only for the rows
that row covers (classes x tile height x image width floats, the overlap with the
next row carried over), and each finished band of rows is handed on at once
(argmax into a uint8 mask, or softmax into the probabilities answer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from .config import ServingConfig
from .transforms import logits_to_mask

# MONAI's default for its Gaussian importance map: sigma = 1/8 of the window.
SIGMA_SCALE = 0.125
# Weights never fall below this fraction of the centre's, so an image corner that only one
# window covers still divides by a sane number.
MIN_WEIGHT = 1e-4

Forward = Callable[[torch.Tensor], torch.Tensor]


def should_tile(width: int, height: int, mode: str, config: ServingConfig) -> bool:
    """Whether a request takes the sliding-window path.

    An image that fits in one window never does: it takes the plain resize path, so
    tiling such an image gives exactly the untiled answer.
    """
    tile_height, tile_width = config.tile_size
    if mode == "off" or (width <= tile_width and height <= tile_height):
        return False
    return mode == "on" or width * height > config.tiling.auto_above_pixels


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Offsets of windows covering [0, length): stride window x (1 - overlap), the last flush with the end."""
    if length <= window:
        return [0]
    stride = max(1, int(window * (1 - overlap)))
    return [*range(0, length - window, stride), length - window]


def window_count(width: int, height: int, tile: tuple[int, int], overlap: float) -> int:
    """How many windows blended_bands runs for an image: known from its size, before any pixel is decoded."""
    def along(length: int, window: int) -> int:
        if length <= window:
            return 1
        stride = max(1, int(window * (1 - overlap)))
        return -(-(length - window) // stride) + 1  # len(window_starts(length, window, overlap))

    return along(height, tile[0]) * along(width, tile[1])


def band_bytes(width: int, classes: int, tile: tuple[int, int]) -> int:
    """Memory blended_bands holds for one row of windows: the weighted logits of a band of the image's width
    (and the previous band's overlap), the weights, the blended band handed on and its argmax: it grows with
    the image's width, not its area (float32 logits, int64 argmax)."""
    padded_width = max(width, tile[1])
    return tile[0] * padded_width * (12 * classes + 17)


def gaussian_importance_map(tile: tuple[int, int], sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
    """float32 (height, width) weights: a Gaussian centred on the window, peak 1, symmetric, > 0."""
    axes = []
    for length in tile:
        x = np.arange(length, dtype=np.float64) - (length - 1) / 2
        axes.append(np.exp(-0.5 * (x / max(length * sigma_scale, 1e-6)) ** 2))
    weights = np.outer(axes[0], axes[1])
    return np.maximum(weights / weights.max(), MIN_WEIGHT).astype(np.float32)


def window_inputs(rows: torch.Tensor, lefts: Sequence[int], tile: tuple[int, int], mean: torch.Tensor,
                  std: torch.Tensor) -> torch.Tensor:
    """The normalized (N, 3, tile height, tile width) model inputs of the windows starting at `lefts` in a band of
    rows (uint8 (3, up to tile height, image width), on the model's device), cut at the image's scale: the
    arithmetic of `to_model_input` (x / 255, then (x - mean) / std) done once for the batch, where the rows are.

    A window reaches past the image only when the image is narrower (or shorter) than a window; that side is
    padded by repeating the edge pixels.
    """
    height, width = min(tile[0], rows.shape[1]), min(tile[1], rows.shape[2])
    crops = torch.stack([rows[:, :height, left:left + width] for left in lefts])
    inputs = crops.to(torch.float32).div_(255.0).sub_(mean).div_(std)
    if (height, width) != tile:
        inputs = F.pad(inputs, (0, tile[1] - width, 0, tile[0] - height), mode="replicate")
    return inputs


def blended_bands(image: Image.Image, forward: Forward, tile: tuple[int, int], overlap: float, batch: int,
                  mean: Sequence[float], std: Sequence[float],
                  device: torch.device | str = "cpu") -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (top, logits) for consecutive bands of rows: blended logits (C, rows, image width).

    `forward` maps (N, 3, h, w) model inputs to (N, C, h', w') logits; the bands are on
    the device its logits come back on. Together the bands cover every row once. Each row of windows goes to
    `device` (the model's) once, as uint8, and its windows are cut and normalized there.
    """
    tile_height, tile_width = tile
    tops = window_starts(image.height, tile_height, overlap)
    lefts = window_starts(image.width, tile_width, overlap)
    padded_width = max(image.width, tile_width)
    weight_cpu = torch.from_numpy(gaussian_importance_map(tile))
    mean_t = torch.tensor(list(mean), dtype=torch.float32, device=device).view(3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32, device=device).view(3, 1, 1)
    weight = carry = carry_weight = None
    for row, top in enumerate(tops):
        logits_sum = weight_sum = None
        band = image.crop((0, top, image.width, min(top + tile_height, image.height)))
        rows = pil_to_tensor(band).to(device, non_blocking=True)
        for first in range(0, len(lefts), batch):
            chunk = lefts[first:first + batch]
            logits = forward(window_inputs(rows, chunk, tile, mean_t, std_t)).float()
            if logits.shape[-2:] != tile:  # a model with a coarser output: back to the window's pixels
                logits = F.interpolate(logits, size=tile, mode="bilinear", align_corners=False)
            if logits_sum is None:
                weight = weight_cpu.to(logits.device)
                logits_sum = logits.new_zeros((logits.shape[1], tile_height, padded_width))
                weight_sum = logits.new_zeros((tile_height, padded_width))
                if carry is not None:  # rows the previous window row overlaps with this one
                    logits_sum[:, :carry.shape[1]] = carry
                    weight_sum[:carry.shape[1]] = carry_weight
            for window_logits, left in zip(logits, chunk, strict=True):
                logits_sum[:, :, left:left + tile_width] += window_logits * weight
                weight_sum[:, left:left + tile_width] += weight
        # Rows above the next window row get no more windows: they are final.
        done = tops[row + 1] - top if row + 1 < len(tops) else tile_height
        rows = min(done, image.height - top)
        yield top, logits_sum[:, :rows, :image.width] / weight_sum[:rows, :image.width]
        carry, carry_weight = logits_sum[:, done:], weight_sum[done:]


def sliding_window(image: Image.Image, forward: Forward, tile: tuple[int, int], overlap: float, batch: int,
                   mean: Sequence[float], std: Sequence[float],
                   to_output: Callable[[torch.Tensor], np.ndarray], device: torch.device | str = "cpu") -> np.ndarray:
    """The whole image's output from blended windows: `to_output` maps each band's logits (C, rows, width) to
    an array (..., rows, width) (labels, label layers, probabilities), and the bands are stacked along rows."""
    output = None
    for top, logits in blended_bands(image, forward, tile, overlap, batch, mean, std, device):
        band = to_output(logits)
        if output is None:
            output = np.empty((*band.shape[:-2], image.height, image.width), band.dtype)
        output[..., top:top + band.shape[-2], :] = band
    return output


def sliding_window_mask(image: Image.Image, forward: Forward, tile: tuple[int, int], overlap: float, batch: int,
                        mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 class-index mask (height, width) of the whole image from blended windows (argmax of the logits)."""
    return sliding_window(image, forward, tile, overlap, batch, mean, std,
                          lambda logits: logits_to_mask(logits, logits.shape[1], logits.shape[2]))


def sliding_window_probs(image: Image.Image, forward: Forward, tile: tuple[int, int], overlap: float, batch: int,
                         mean: Sequence[float], std: Sequence[float],
                         channels: Sequence[int] | None = None) -> np.ndarray:
    """float16 (classes, height, width) softmax of the blended logits; only `channels` when given."""
    def probs(logits: torch.Tensor) -> np.ndarray:
        band = logits.softmax(0)
        return (band if channels is None else band[list(channels)]).to(torch.float16).cpu().numpy()

    return sliding_window(image, forward, tile, overlap, batch, mean, std, probs)
