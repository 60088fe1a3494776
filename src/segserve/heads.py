"""Model heads: how a model's output channels become class probabilities and masks, one registry entry each.

- softmax: one channel per class, classes exclusive (cross-entropy training; torchvision, SegFormer, ...).
  A pixel is its highest-scoring class; with a `threshold`, a pixel whose top probability is below it
  becomes background (class 0) or `postprocess.ignore_label`.
- binary: one sigmoid channel for one class (`smp.Unet(classes=1)`, lesion / no lesion). Classes are
  background + that class; a pixel is the class where its probability is over `threshold` (0.5).
- multilabel: one sigmoid channel per class, classes may overlap. Classes are background + the labels
  (channel k is class k + 1); each class's own mask is its probability over `threshold`, overlaps kept;
  a single-label answer (PNG) gives each pixel its highest-scoring class above the threshold, else 0.

Every head maps logits at the image's size (resized or one tiling band) to `MaskSet.pack`'s array, so the
resized and the tiled paths decide masks the same way. The build detects the head from the model's output
channels and the class list (`detect`), or takes `--head`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .config import HEADS as NAMES
from .transforms import logits_to_mask, upsample_logits

SOFTMAX, BINARY, MULTILABEL = NAMES
# Class names that say "class 0 is the background" (the build's head detection reads them).
BACKGROUND_NAMES = frozenset({"background", "bg", "_background_", "__background__", "none", "void",
                              "unlabeled", "unlabelled", "nothing", "other"})
DEFAULT_SIGMOID_THRESHOLD = 0.5


class HeadError(ValueError):
    """The head does not fit the model's output channels and class list; the message says which flag to pass."""


@dataclass(frozen=True)
class Head:
    name: str
    sigmoid: bool  # independent per-channel probabilities; else a softmax across channels
    overlapping: bool  # classes may overlap: each class has its own mask (MaskSet.layers)

    def channels(self, num_classes: int) -> int:
        """The model's output channels for `num_classes` classes (background included)."""
        return num_classes if self.name == SOFTMAX else num_classes - 1

    def threshold(self, requested: float | None) -> float | None:
        """The probability cut in force: the request's or config's, else 0.5 for sigmoid heads, none for softmax."""
        if requested is not None:
            return requested
        return DEFAULT_SIGMOID_THRESHOLD if self.sigmoid else None


HEADS: dict[str, Head] = {head.name: head for head in (
    Head(SOFTMAX, sigmoid=False, overlapping=False),
    Head(BINARY, sigmoid=True, overlapping=False),
    Head(MULTILABEL, sigmoid=True, overlapping=True),
)}


def get(name: str) -> Head:
    return HEADS[name]


def _logit(probability: float) -> float:
    """sigmoid(x) > p  <=>  x > logit(p): sigmoid heads compare logits, never compute a sigmoid per pixel."""
    if probability <= 0:
        return -math.inf
    if probability >= 1:
        return math.inf
    return math.log(probability / (1 - probability))


def decide(head: Head, logits: torch.Tensor, height: int, width: int, threshold: float | None,
           ignore_label: int = 0) -> np.ndarray:
    """(C, h, w) logits -> the masks at (height, width), as `MaskSet.pack` lays them out:
    uint8 (height, width) labels, or for an overlapping head uint8 (1 + C, height, width): labels, then
    one 0/1 layer per label class.

    Logits, not labels, are upsampled (bilinear), so boundaries land between input pixels."""
    threshold = head.threshold(threshold)
    if head.name == SOFTMAX:
        if threshold is None:
            return logits_to_mask(logits, height, width)  # the fast path: only classes that can win are upsampled
        probs = upsample_logits(logits, height, width).softmax(0)
        top, labels = probs.max(0)
        labels = torch.where(top >= threshold, labels, torch.full_like(labels, ignore_label))
        return labels.to(torch.uint8).cpu().numpy()
    cut = _logit(threshold)
    scores = upsample_logits(logits, height, width)
    if head.name == BINARY:
        return (scores[0] > cut).to(torch.uint8).cpu().numpy()
    best, index = scores.max(0)
    labels = torch.where(best > cut, index + 1, torch.zeros_like(index)).to(torch.uint8)
    layers = (scores > cut).to(torch.uint8)
    return torch.cat([labels[None], layers]).cpu().numpy()


def probabilities(head: Head, logits: torch.Tensor, channels: Sequence[int] | None = None) -> torch.Tensor:
    """(C, H, W) logits at the image's size -> (classes, H, W) probabilities in the logits' float type, one
    plane per class id (only `channels`, class ids, when given). For sigmoid heads the background's is 1 - the
    highest class probability (for a binary head exactly 1 - p)."""
    logits = logits if logits.is_floating_point() else logits.float()
    if head.sigmoid:
        labels = logits.sigmoid()
        probs = torch.cat([1 - labels.max(0, keepdim=True).values, labels])
    else:
        probs = logits.softmax(0)
    return probs if channels is None else probs[list(channels)]


def detect(names: list, channels: int, requested: str | None = None, default: str | None = None) -> tuple[str, list]:
    """The head and the class list for a model with `channels` output channels and these class names
    (strings, or {name, color} entries).

    A sigmoid head's class list starts with the background: given without it (`--classes lesion`), it is
    added. Without `requested`, the head follows from the counts (`default`, a family's own, wins where it
    fits):
    - channels == classes: softmax, when class 0 is a background name; otherwise ambiguous (softmax over
      these classes, or a multi-label model of them) unless the family says;
    - one channel: binary (the class list is one class, or background + one);
    - channels == classes - 1, class 0 a background name: multilabel.
    """
    count, first = len(names), _name(names[0]) if names else ""
    with_background = [{"name": "background", "color": [0, 0, 0]}, *names]
    if requested is not None:
        head = get(requested)
        if head.sigmoid and channels == count:
            names = with_background
        expected = head.channels(len(names))
        if channels != expected:
            raise HeadError(f"--head {requested} with {count} classes ({_listing(names)}) expects {expected} output "
                            f"channel(s), but the model outputs {channels}")
        return requested, names
    if channels == 1 and count in (1, 2):
        return BINARY, with_background if count == 1 else names
    if channels == count and count >= 2:
        if default is not None and get(default).channels(count) == channels:
            return default, names
        if first.lower() in BACKGROUND_NAMES:
            return SOFTMAX, names
        raise HeadError(f"the model outputs {channels} channels for {count} classes ({_listing(names)}) and class 0 "
                        f"({first!r}) is not a background: pass --head softmax (one class per pixel) or --head "
                        "multilabel (independent sigmoid per class, background added)")
    if channels == count - 1 and channels >= 2 and first.lower() in BACKGROUND_NAMES:
        return MULTILABEL, names
    raise HeadError(f"the model outputs {channels} channel(s) but {count} classes are configured ({_listing(names)}): "
                    f"a softmax head needs {channels} classes, a binary head one class (or background + one), a "
                    f"multilabel head background + {channels} labels; fix --classes or pass --head")


def _name(entry) -> str:
    return str(entry.get("name", "")) if isinstance(entry, dict) else str(entry)


def _listing(names: list) -> str:
    shown = [_name(n) for n in names[:8]]
    return ", ".join(shown) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
