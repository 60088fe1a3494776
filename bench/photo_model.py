"""Weights for the photo workloads that segment like a trained model, made in seconds without a download.

Random weights are no benchmark of the mask step: their logits are nearly constant over the image (a
spatial spread of 1e-3 for LR-ASPP, 1e-10 for DeepLabV3), so one class wins everywhere. A trained
model shows a few classes in regions, and the mask step's cost depends on that. Here the random
backbone's BatchNorm statistics are recomputed on generated photos and the classifier head is fitted
to their drawn objects (`photos.photo_and_labels`): masks then show background, "person" and "car" in
regions that follow the objects, with 1-4% of logit pixels on a class boundary.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from bench.photos import photo_and_labels
from segserve.families import IMAGENET_MEAN, IMAGENET_STD  # what the archives normalize with
from segserve.transforms import to_model_input

FIT_SIZE = (195, 260)  # (height, width): small enough to fit in seconds on 2 cores
FIT_PHOTOS, FIT_STEPS = 8, 40


def _batch(seeds: range, size: tuple[int, int] = FIT_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Model inputs as the archives make them (transforms.to_model_input), and labels at the same size."""
    inputs, labels = [], []
    for seed in seeds:
        image, label = photo_and_labels(seed)
        inputs.append(to_model_input(image, size, IMAGENET_MEAN, IMAGENET_STD))
        labels.append(torch.from_numpy(np.array(Image.fromarray(label).resize(size[::-1],
                                                                               Image.Resampling.NEAREST))))
    return torch.stack(inputs), torch.stack(labels).long()


def fit_photo_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """Recompute BatchNorm statistics and fit the classifier head of a torchvision segmentation model
    (LR-ASPP or DeepLabV3) to labelled generated photos; returns the model in eval mode."""
    torch.manual_seed(seed)
    inputs, labels = _batch(range(1000, 1000 + FIT_PHOTOS))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches below
    model.train()
    with torch.no_grad():
        for start in range(0, FIT_PHOTOS, 4):
            model(inputs[start:start + 4])
    model.eval()
    with torch.no_grad():
        features = model.backbone(inputs)
        if isinstance(model.classifier, nn.Sequential):  # DeepLabHead: fit its last 1x1 convolution
            head_input = features["out"]
            for layer in list(model.classifier)[:-1]:
                head_input = layer(head_input)
            head = model.classifier[-1]
        else:  # LRASPPHead takes the backbone's dict
            head_input, head = features, model.classifier
    _fit(head, head_input, labels, FIT_SIZE)
    return model


def _fit(head: nn.Module, head_input, labels: torch.Tensor, size: tuple[int, int]) -> None:
    """Fit `head` (frozen afterwards) to the drawn labels on the features it receives."""
    parameters = list(head.parameters())
    optimizer = torch.optim.Adam(parameters, lr=0.01)
    for _ in range(FIT_STEPS):
        logits = F.interpolate(head(head_input), size=size, mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for parameter in parameters:
        parameter.requires_grad_(False)


# Encoders that halve the input five times (smp's ResNets, SegFormer) need sides divisible by 32.
FIT_SIZE_32 = (192, 256)


def fit_classifier(model: nn.Module, classifier: nn.Conv2d, logits: Callable[[torch.Tensor], torch.Tensor],
                   seed: int = 0) -> nn.Module:
    """The same for any model whose last layer is a convolution (an smp model's segmentation head, a
    SegFormer's decode_head.classifier): BatchNorm statistics recomputed on generated photos, then that
    layer fitted to their drawn objects on the features it receives; `logits(x)` runs the model. Returns
    the model in eval mode."""
    torch.manual_seed(seed)
    inputs, labels = _batch(range(1000, 1000 + FIT_PHOTOS), FIT_SIZE_32)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for start in range(0, FIT_PHOTOS, 4):
            logits(inputs[start:start + 4])
    model.eval()
    captured: list[torch.Tensor] = []
    hook = classifier.register_forward_hook(lambda _module, args, _output: captured.append(args[0].detach()))
    with torch.no_grad():
        for start in range(0, FIT_PHOTOS, 4):
            logits(inputs[start:start + 4])
    hook.remove()
    _fit(classifier, torch.cat(captured), labels, FIT_SIZE_32)
    return model
