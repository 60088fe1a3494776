"""What inference makes for one request, and the post-processing every mask format shares.

A `MaskSet` holds the single-label mask (uint8 class ids at the image's size: what the PNG shows) and, for
an overlapping (multi-label) head, one binary layer per label class, so the per-class formats (rle,
polygons, json's summary, instances) keep overlaps. Encoders ask `binary(class_id)` and never care which
head made the masks.

Post-processing runs on the full-size masks, after the head's threshold and before any encoder, in this
order: `smooth` (a radius in pixels: `median` = the majority class in the (2r+1)^2 window, which is the
median filter for two classes; `open` / `close` = OpenCV morphology per class with an elliptical kernel),
`fill_holes` (background fully enclosed by one class becomes that class), then `min_area` (8-connected
regions smaller than that many pixels become background). On the label mask a class's opened-away
pixels become background, and a close only claims background pixels; layers are processed one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PostProcess:
    """The request's post-processing, with the model config's defaults filled in (segserve.options)."""

    threshold: float | None = None  # None: the head's default (0.5 for sigmoid heads, argmax for softmax)
    smooth: int = 0  # radius in pixels; 0 = off
    smooth_method: str = "median"
    fill_holes: bool = False
    min_area: int = 0

    @property
    def changes_masks(self) -> bool:
        """Whether anything runs after the head's decision."""
        return self.smooth > 0 or self.fill_holes or self.min_area > 1


@dataclass
class MaskSet:
    labels: np.ndarray  # uint8 (H, W) class ids
    layers: np.ndarray | None = None  # uint8 0/1 (labels, H, W): class id k + 1's own mask; overlapping heads

    @classmethod
    def of(cls, masks: MaskSet | np.ndarray) -> MaskSet:
        """A MaskSet as it is, or a plain uint8 (H, W) label mask as one."""
        return masks if isinstance(masks, MaskSet) else cls(masks)

    @classmethod
    def unpack(cls, packed: np.ndarray) -> MaskSet:
        """From `heads.decide`'s layout: (H, W) labels, or (1 + C, H, W) labels then layers."""
        if packed.ndim == 2:
            return cls(packed)
        return cls(packed[0], packed[1:])

    @property
    def shape(self) -> tuple[int, int]:
        return self.labels.shape

    def binary(self, class_id: int) -> np.ndarray:
        """bool (H, W): the pixels of one class (its own layer where classes overlap)."""
        if self.layers is not None and class_id > 0:
            return self.layers[class_id - 1].astype(bool)
        return self.labels == class_id

    def keep_classes(self, classes: tuple[int, ...] | None) -> MaskSet:
        """Pixels of classes not asked for become background; their layers are cleared."""
        if classes is None:
            return self
        labels, layers = keep_classes(self.labels, classes), None
        if self.layers is not None:
            wanted = np.isin(np.arange(1, self.layers.shape[0] + 1), classes)
            layers = self.layers * wanted[:, None, None].astype(np.uint8)
        return MaskSet(labels, layers)


def keep_classes(labels: np.ndarray, classes: tuple[int, ...] | None) -> np.ndarray:
    """A label mask whose pixels of classes not asked for are background (0)."""
    if classes is None:
        return labels
    return np.where(np.isin(labels, classes), labels, 0).astype(np.uint8)


def postprocess(masks: MaskSet, post: PostProcess) -> MaskSet:
    """The masks after smooth, fill_holes and min_area (in that order); the same object when none is asked."""
    if not post.changes_masks:
        return masks
    if masks.layers is not None:
        layers = np.stack([_binary_steps(layer.astype(bool), post) for layer in masks.layers]).astype(np.uint8)
        # A pixel keeps its label while that class's layer still has it, else takes its first remaining class.
        first = np.where(layers.any(0), layers.argmax(0) + 1, 0)
        index = np.clip(masks.labels.astype(np.int64) - 1, 0, None)
        kept = (masks.labels > 0) & np.take_along_axis(layers, index[None], 0)[0].astype(bool)
        return MaskSet(np.where(kept, masks.labels, first).astype(np.uint8), layers)
    labels = masks.labels
    if post.smooth > 0:
        labels = _smooth_labels(labels, post.smooth, post.smooth_method)
    if post.fill_holes:
        labels = _fill_label_holes(labels)
    if post.min_area > 1:
        labels = _drop_small_labels(labels, post.min_area)
    return MaskSet(labels)


def _kernel(radius: int) -> np.ndarray:
    import cv2

    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _binary_steps(binary: np.ndarray, post: PostProcess) -> np.ndarray:
    import cv2

    if post.smooth > 0:
        if post.smooth_method == "median":
            binary = cv2.medianBlur(binary.astype(np.uint8), 2 * post.smooth + 1) > 0
        else:
            op = cv2.MORPH_OPEN if post.smooth_method == "open" else cv2.MORPH_CLOSE
            binary = cv2.morphologyEx(binary.astype(np.uint8), op, _kernel(post.smooth)) > 0
    if post.fill_holes:
        binary = fill_holes(binary)
    if post.min_area > 1:
        binary = remove_small_regions(binary, post.min_area)
    return binary


def _smooth_labels(labels: np.ndarray, radius: int, method: str) -> np.ndarray:
    import cv2

    present = [int(c) for c in np.unique(labels)]
    if len(present) < 2:
        return labels
    if method == "median":
        # The majority class of each window (box filter counts per class); ties keep the pixel's own class.
        size = 2 * radius + 1
        votes = np.stack([cv2.blur((labels == c).astype(np.float32), (size, size), borderType=cv2.BORDER_REFLECT)
                          + 0.5 / size ** 2 * (labels == c) for c in present])
        return np.asarray(present, np.uint8)[votes.argmax(0)]
    kernel, out = _kernel(radius), labels.copy()
    for c in present:
        if c == 0:
            continue
        binary = (labels == c).astype(np.uint8)
        if method == "open":
            out[(binary > 0) & (cv2.morphologyEx(binary, cv2.MORPH_OPEN, kernel) == 0)] = 0
        else:
            out[(cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel) > 0) & (out == 0)] = c
    return out


def fill_holes(binary: np.ndarray) -> np.ndarray:
    """bool mask with every region of False not connected to the border (4-connected) set True."""
    import cv2

    if not binary.any():
        return binary
    count, labels = cv2.connectedComponents((~binary).astype(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    inside = np.ones(count, bool)
    inside[border] = False
    inside[0] = False  # label 0 is the True pixels
    return binary | inside[labels]


def _fill_label_holes(labels: np.ndarray) -> np.ndarray:
    """Background regions (4-connected) off the border whose every neighbour is one class take that class."""
    import cv2

    count, regions = cv2.connectedComponents((labels == 0).astype(np.uint8), connectivity=4)
    if count <= 1:
        return labels
    border = np.unique(np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]]))
    # The classes next to each background region: pairs (region, neighbour's class) over the 4 neighbours.
    pairs = []
    for a, b in ((regions[:, :-1], labels[:, 1:]), (regions[:, 1:], labels[:, :-1]),
                 (regions[:-1], labels[1:]), (regions[1:], labels[:-1])):
        edge = (a > 0) & (b > 0)
        pairs.append(np.stack([a[edge], b[edge]], 1))
    pairs = np.unique(np.concatenate(pairs), axis=0)
    region_ids, counts = np.unique(pairs[:, 0], return_counts=True)
    enclosed = region_ids[counts == 1]
    enclosed = enclosed[~np.isin(enclosed, border)]
    fill = np.zeros(count, np.uint8)
    owner = dict(map(tuple, pairs[np.isin(pairs[:, 0], enclosed)]))
    for region, c in owner.items():
        fill[region] = c
    filled = fill[regions]
    return np.where(filled > 0, filled, labels).astype(np.uint8)


def remove_small_regions(binary: np.ndarray, min_area: int) -> np.ndarray:
    """Drop 8-connected regions smaller than min_area pixels."""
    if min_area <= 1 or not binary.any():
        return binary
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False  # label 0 is the rest of the image
    return keep[labels]


def _drop_small_labels(labels: np.ndarray, min_area: int) -> np.ndarray:
    out = labels.copy()
    for c in np.unique(labels):
        if c == 0:
            continue
        binary = labels == c
        out[binary & ~remove_small_regions(binary, min_area)] = 0
    return out


def instances(binary: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """The 8-connected regions of a binary mask: int32 region ids (0 = none) and per region its area,
    COCO bbox [x, y, width, height] and centroid [x, y] (pixel centres)."""
    import cv2

    count, regions, stats, centroids = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    entries = [{"area": int(stats[i, cv2.CC_STAT_AREA]),
                "bbox": [int(stats[i, cv2.CC_STAT_LEFT]), int(stats[i, cv2.CC_STAT_TOP]),
                         int(stats[i, cv2.CC_STAT_WIDTH]), int(stats[i, cv2.CC_STAT_HEIGHT])],
                "centroid": [round(float(centroids[i, 0]), 2), round(float(centroids[i, 1]), 2)]}
               for i in range(1, count)]
    return regions, entries
