"""Image -> model input, and logits -> mask at the image's own size."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import InterpolationMode, normalize, pil_to_tensor, resize


def to_model_input(image: Image.Image, size: tuple[int, int], mean: Sequence[float],
                   std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> normalized float tensor (3, H, W) at the model's input size.

    `size` is (height, width). Pillow's resize filters antialias when shrinking,
    so large photos keep their small structures better than a plain sample.
    """
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    tensor = pil_to_tensor(image).to(torch.float32).div_(255.0)
    return normalize(tensor, list(mean), list(std), inplace=True)


def tensor_to_model_input(pixels: torch.Tensor, size: tuple[int, int], mean: Sequence[float],
                           std: Sequence[float]) -> torch.Tensor:
    """uint8 RGB tensor (3, H, W) on any device -> normalized float tensor (3, height, width) there.

    The tensor twin of `to_model_input` for images decoded by torchvision (on the GPU): antialiased
    bilinear resize, as Pillow's, so both paths give the model nearly the same pixels.
    """
    if pixels.shape[-2:] != size:
        pixels = resize(pixels, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
    tensor = pixels.to(torch.float32).div_(255.0)
    return normalize(tensor, list(mean), list(std), inplace=True)


def logits_to_mask(logits: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Class logits (C, h, w) -> uint8 class-index mask (height, width), computed on the logits' device.

    Logits, not labels, are upsampled (bilinear), so boundaries land between input pixels as they
    should rather than in blocks of the model's stride. The result is `reference_mask`'s, faster:
    - channels-last layout puts each pixel's C logits side by side, so the upsampling kernel and the
      argmax read memory in order (3-10x faster on CPU than planar);
    - only the classes that can win somewhere are upsampled (`candidate_classes`): a photo shows a
      few of a model's 21 or 150 classes, and upsampling the rest to every output pixel was most of
      the cost (21 classes to 1280x960: ~110 ms for all, ~25 ms for 3).
    """
    if logits.dim() != 3:
        raise ValueError(f"expected logits of shape (C, h, w), got {tuple(logits.shape)}")
    # (h, w, C) memory, viewed as (1, C, h, w) below. Not unsqueeze(0) + contiguous(channels_last): a logits
    # slice of a channels-last batch then gets a batch stride equal to C, which F.interpolate reads as
    # planar, and the planar kernel is 5x slower (measured 370 vs 75 ms, 21 classes to 1280x960).
    pixels = logits.float().permute(1, 2, 0).contiguous()
    classes = None
    if pixels.shape[:2] != (height, width):
        # On a GPU every class is upsampled: the exclusion test's answer (which classes, how many) needs the
        # host to wait for the device, which costs more there than the upsampling it saves.
        classes = None if pixels.is_cuda else candidate_classes(pixels)
        if classes is not None and classes.numel() == 1:
            return np.full((height, width), int(classes[0]), dtype=np.uint8)
        if classes is not None:
            pixels = pixels[..., classes]
        pixels = F.interpolate(pixels.unsqueeze(0).permute(0, 3, 1, 2), size=(height, width), mode="bilinear",
                               align_corners=False)[0].permute(1, 2, 0)
    labels = pixels.argmax(-1)
    if classes is not None:
        labels = classes[labels]
    return labels.to(torch.uint8).cpu().numpy()


# Above this share of mixed cells (boundaries all over the map: noise rather than a segmentation) the
# exclusion test is skipped and every class upsampled: it costs up to ~0.9 ms per 1% of mixed cells in a
# 520x390 map, against ~110 ms to upsample 21 classes to 1280x960.
_MIXED_CELLS_MAX = 0.25


def candidate_classes(pixels: torch.Tensor) -> torch.Tensor | None:
    """The classes (sorted indices) that can win anywhere in a bilinear resampling of (h, w, C) logits;
    None for all of them.

    Every resampled pixel is a convex blend of one 2x2 cell of logit pixels, so exactly:
    - a cell whose four corners share an argmax keeps it everywhere (a blend of logits that all rank
      that class first ranks it first);
    - in a mixed cell, a class below the top-left corner's winner at all four corners stays below it
      everywhere in the cell.
    The classes left are those that win a logit pixel, plus those not excluded in some mixed cell.
    Excluded classes are strictly below a kept one, so the argmax (and its tie-break) is unchanged.
    """
    # A one-pixel-high (or wide) map blends neighbours along one axis only: as cells of a repeated row.
    pixels = pixels.expand(max(pixels.shape[0], 2), max(pixels.shape[1], 2), -1)
    winners = pixels.argmax(-1)
    keep = torch.bincount(winners.flatten(), minlength=pixels.shape[-1]) > 0
    corner = winners[:-1, :-1]
    mixed = (corner != winners[:-1, 1:]) | (corner != winners[1:, :-1]) | (corner != winners[1:, 1:])
    rows, cols = mixed.nonzero(as_tuple=True)
    if rows.numel() > _MIXED_CELLS_MAX * mixed.numel():
        return None
    if rows.numel():
        leader = corner[rows, cols].unsqueeze(-1)
        for dy in (0, 1):
            for dx in (0, 1):
                logits = pixels[rows + dy, cols + dx]  # (cells, C)
                keep |= (logits >= logits.gather(1, leader)).any(0)
    return None if keep.all() else keep.nonzero().flatten()


def reference_mask(logits: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of every class's logits, then argmax: what `logits_to_mask` reproduces.

    Logits, not labels, are upsampled, so boundaries land between input pixels as they should rather
    than in blocks of the model's stride.
    """
    return upsample_logits(logits, height, width).argmax(0).to(torch.uint8).cpu().numpy()


def upsample_logits(logits: torch.Tensor, height: int, width: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Class logits (C, h, w) -> logits (C, height, width) in `dtype`, bilinear."""
    if logits.dim() != 3:
        raise ValueError(f"expected logits of shape (C, h, w), got {tuple(logits.shape)}")
    if logits.shape[-2:] == (height, width):
        return logits.to(dtype)
    return F.interpolate(logits.unsqueeze(0).to(dtype), size=(height, width), mode="bilinear",
                         align_corners=False)[0]
