"""The speed levers give the reference path's masks: channels-last logits upsampling, channels-last model.

Agreement, not timing: `make bench` measures the speed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from PIL import Image

from segserve.pipeline import Segmenter
from segserve.tools.synthetic import generate_scene
from segserve.transforms import candidate_classes, logits_to_mask, reference_mask


@pytest.mark.parametrize("classes, low, size", [
    (3, (256, 256), (384, 512)),     # the default model, a 512x384 image
    (21, (65, 65), (960, 1280)),     # a VOC model's stride-8 logits, a 1280x960 photo
    (21, (520, 520), (375, 500)),    # torchvision's full-size logits, shrunk
    (4, (7, 9), (100, 37)),          # odd sizes, upsampling one way and shrinking the other
    (2, (32, 48), (32, 48)),         # already at size: argmax only
])
def test_mask_equals_upsample_then_argmax(classes, low, size):
    torch.manual_seed(classes)
    # Smooth logits like a real model's, plus noise so that near-ties happen.
    logits = F.interpolate(torch.randn(1, classes, low[0] // 4 + 2, low[1] // 4 + 2) * 4, size=low,
                           mode="bicubic")[0] + 0.01 * torch.randn(classes, *low)
    fast, reference = logits_to_mask(logits, *size), reference_mask(logits, *size)
    assert fast.shape == size and fast.dtype == np.uint8
    assert (fast == reference).mean() >= 0.9999


def scene_logits(seed: int, classes: int, shown: int, low: tuple[int, int]) -> torch.Tensor:
    """Logits like a trained model's on a photo: `shown` of the classes compete in smooth regions,
    the others are far below everywhere."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(classes, *low, generator=generator) - 30
    shown_classes = torch.randperm(classes, generator=generator)[:shown]
    fields = F.interpolate(torch.randn(1, shown, 6, 8, generator=generator), size=low, mode="bicubic")[0]
    logits[shown_classes] = 6 * fields + 0.3 * torch.randn(shown, *low, generator=generator)
    return logits


@pytest.mark.parametrize("classes, shown, low, size", [
    (21, 3, (65, 65), (960, 1280)),
    (21, 6, (390, 520), (960, 1280)),
    (150, 3, (64, 64), (512, 683)),   # an ADE20K-sized head
    (21, 3, (520, 520), (375, 500)),  # shrinking
])
def test_only_the_classes_that_can_win_are_upsampled(classes, shown, low, size):
    logits = scene_logits(classes + shown, classes, shown, low)
    kept = candidate_classes(logits.permute(1, 2, 0).contiguous())
    assert kept is not None and kept.numel() == shown  # the shortcut is taken
    assert set(kept.tolist()) == set(logits.argmax(0).unique().tolist())
    fast, reference = logits_to_mask(logits, *size), reference_mask(logits, *size)
    assert (fast == reference).mean() >= 0.9999


def test_a_class_that_wins_only_between_logit_pixels_is_kept():
    # Class 2 is third at both pixels and first half-way: (10, 9, 8, 0, 0) and (0, 0, 8, 10, 9) blend to
    # (5, 4.5, 8, 5, 4.5). Classes 5 and 6 are below everywhere and are left out.
    pair = torch.tensor([[10.0, 0.0], [9.0, 0.0], [8.0, 8.0], [0.0, 10.0], [0.0, 9.0], [-20.0, -20.0],
                         [-30.0, -30.0]])
    logits = pair.repeat_interleave(4, dim=1)[:, None, :]  # one row: four pixels of each, one boundary
    kept = candidate_classes(logits.permute(1, 2, 0).contiguous())
    assert kept is not None and kept.tolist() == [0, 1, 2, 3, 4]
    mask = logits_to_mask(logits, 3, 32)
    assert np.array_equal(mask, reference_mask(logits, 3, 32))
    assert 2 in mask


def test_a_map_with_one_class_gives_a_constant_mask():
    logits = torch.randn(21, 33, 44) - 10
    logits[7] += 20
    mask = logits_to_mask(logits, 300, 400)
    assert mask.shape == (300, 400) and (mask == 7).all()
    assert np.array_equal(mask, reference_mask(logits, 300, 400))


def test_noise_falls_back_to_every_class():
    logits = torch.randn(21, 40, 40, generator=torch.Generator().manual_seed(0))
    assert candidate_classes(logits.permute(1, 2, 0).contiguous()) is None
    assert (logits_to_mask(logits, 100, 100) == reference_mask(logits, 100, 100)).mean() >= 0.9999


def test_channels_last_model_gives_the_same_masks(config):
    planar = Segmenter.from_model_dir(REPO / "model", config=dataclasses.replace(config, channels_last=False),
                                      warm_up=False)
    nhwc = Segmenter.from_model_dir(REPO / "model", config=dataclasses.replace(config, channels_last=True),
                                    warm_up=False)
    images = [Image.fromarray(generate_scene(900 + i, (384, 512))[0]) for i in range(3)]
    for a, b in zip(planar.predict(images), nhwc.predict(images), strict=True):
        assert (a == b).mean() >= 0.995
    kernel = next(p for p in nhwc.model.parameters() if p.dim() == 4)
    assert kernel.is_contiguous(memory_format=torch.channels_last)


def jpeg(image: Image.Image, **params) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92, **params)
    return buffer.getvalue()


def test_draft_decoding_reduces_a_large_jpeg_but_never_below_the_model_input(config):
    from segserve.decode import ImageFile, decode_image

    scene = Image.fromarray(generate_scene(7, (768, 1024))[0])
    file = ImageFile(jpeg(scene), config.limits)
    assert (file.header.width, file.header.height) == (1024, 768)
    assert file.decode(reduce_to=(256, 256)).size == (512, 384)  # libjpeg's 1/2 scale: 1/4 is 192 high, under 256
    assert ImageFile(jpeg(scene), config.limits).decode(reduce_to=(520, 520)).size == (1024, 768)
    assert decode_image(jpeg(scene), config.limits).size == (1024, 768)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the full size is reported upright
    file = ImageFile(jpeg(scene, exif=exif), config.limits)
    assert (file.header.width, file.header.height) == (768, 1024)
    assert file.decode(reduce_to=(256, 256)).size == (384, 512)


def test_draft_decoded_masks_agree_with_full_decoding(handler):
    from segserve.tools.inprocess import Request, handle

    for seed in range(3):
        data = jpeg(Image.fromarray(generate_scene(40 + seed, (768, 1024))[0]))
        (png,) = handle(handler, [Request({"body": data}, {"Accept": "image/png"})])
        mask = np.asarray(Image.open(__import__("io").BytesIO(png.body)))
        full = handler.segmenter.predict([Image.open(__import__("io").BytesIO(data)).convert("RGB")])[0]
        assert mask.shape == full.shape == (768, 1024)
        assert (mask == full).mean() >= 0.995


def test_compiled_model_gives_the_eager_masks(config, tmp_path):
    from safetensors.torch import save_file

    from segserve.families import build_model

    # A small U-Net keeps the compile (inductor, C++ on CPU) to seconds.
    torch.manual_seed(0)
    tiny = dataclasses.replace(config, arch_params={"base_channels": 4, "depth": 2}, input_size=(64, 64),
                               weights="tiny.safetensors")
    save_file(build_model("unet", 3, base_channels=4, depth=2).state_dict(), str(tmp_path / "tiny.safetensors"))
    eager = Segmenter.from_model_dir(tmp_path, config=tiny, warm_up=False)
    compiled = Segmenter.from_model_dir(tmp_path, config=dataclasses.replace(tiny, compile=True))
    assert compiled.model is not eager.model and hasattr(compiled.model, "_orig_mod")  # torch.compile's wrapper
    images = [Image.fromarray(generate_scene(70 + i, (90, 120))[0]) for i in range(2)]
    for a, b in zip(eager.predict(images), compiled.predict(images), strict=True):
        assert (a == b).mean() >= 0.995
