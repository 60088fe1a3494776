"""Batched torchvision JPEG decoding (runtime.decoder; nvJPEG on a GPU) gives Pillow's answers.

The decoder runs on the CPU here, so CI checks the same code path the GPU takes; tests/test_gpu.py
repeats the agreement on CUDA where there is one.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image
from support import REPO, jpeg
from support.handlers import model_yaml

from segserve.config import ConfigError, ServingConfig
from segserve.plan import Planner
from segserve.tools.inprocess import Request, handle, load_handler
from segserve.tools.synthetic import generate_scene


def scene(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(generate_scene(seed, size)[0])


@pytest.fixture(scope="module")
def segmenters():
    """The handler on model/ with each JPEG decoder."""
    return tuple(load_handler(REPO / "model", model_yaml_config=model_yaml(runtime={"decoder": decoder}))
                 for decoder in ("pillow", "torchvision"))


def answers(handler, bodies: list[bytes]) -> list[tuple[int, np.ndarray | dict]]:
    replies = handle(handler, [Request({"body": body}, {"Accept": "image/png"}) for body in bodies])
    return [(r.status, np.asarray(Image.open(io.BytesIO(r.body))) if r.status == 200 else r.body) for r in replies]


def rotated(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6 and 8 are shown turned 90 degrees: the mask comes back 300 wide, 411 high
    return jpeg(scene(5, (300, 411)), exif=exif)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pillow_does(orientation):
    from PIL import ImageOps

    from segserve.decode import upright

    stored = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    exif = stored.getexif()
    exif[0x0112] = orientation
    stored.info["exif"] = exif.tobytes()
    shown = np.asarray(ImageOps.exif_transpose(stored))
    mine = upright(torch.from_numpy(np.array(stored)).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert np.array_equal(mine, shown)


def test_decoder_choice(config):
    assert Planner(config).batch_decode is False  # auto on CPU: Pillow
    assert Planner(config, "cuda:0").batch_decode is True  # auto on a GPU: nvJPEG
    assert Planner(dataclasses.replace(config, decoder="torchvision")).batch_decode is True
    assert Planner(dataclasses.replace(config, decoder="pillow"), "cuda:0").batch_decode is False
    section = {"model": {"name": "m", "arch": "unet", "weights": "w"}, "input": {"size": 64},
               "classes": ["a", "b"], "runtime": {"decoder": "nvjpeg"}}
    with pytest.raises(ConfigError, match="handler.runtime.decoder must be one of auto, pillow, torchvision"):
        ServingConfig.from_dict(section)


def test_batched_jpeg_masks_agree_with_pillow(segmenters):
    pillow, batched = segmenters
    bodies = [jpeg(scene(20, (384, 512))), jpeg(scene(21, (768, 1024))),  # the second is draft-decoded by Pillow
              jpeg(scene(22, (240, 200)).convert("L")), rotated(6), rotated(3), rotated(8), jpeg(scene(23, (97, 61)))]
    expected, got = answers(pillow, bodies), answers(batched, bodies)
    for (status_a, a), (status_b, b) in zip(expected, got, strict=True):
        assert status_a == status_b == 200
        assert a.shape == b.shape
        assert (a == b).mean() >= 0.995
    assert got[3][1].shape == got[5][1].shape == (411, 300) and got[4][1].shape == (300, 411)


def test_a_bad_jpeg_fails_alone_and_other_formats_take_pillows_path(segmenters):
    pillow, batched = segmenters
    good = jpeg(scene(30, (384, 512)))
    cmyk = jpeg(scene(31, (200, 240)).convert("CMYK"))
    png = io.BytesIO()
    scene(32, (150, 170)).save(png, format="PNG")
    bodies = [good, good[: len(good) // 2], cmyk, png.getvalue(), b"\xff\xd8\xff\xe0 not a jpeg", good]
    expected, got = answers(pillow, bodies), answers(batched, bodies)
    assert [s for s, _ in got] == [s for s, _ in expected] == [200, 400, 200, 200, 400, 200]
    for (status, a), (_, b) in zip(expected, got, strict=True):
        if status == 200:
            assert (a == b).mean() >= 0.995
        else:
            assert a == b  # the same JSON error, word for word


def prepared(handler, bodies: list[bytes]):
    """The Batch the handler's preprocess hands to its inference (Segmenter.prepare)."""
    return handler.segmenter.prepare([{"body": body} for body in bodies], [{}] * len(bodies), [None] * len(bodies))


def test_model_inputs_are_made_by_torchvision_on_the_models_device(segmenters, monkeypatch):
    pillow, batched = segmenters
    bodies = [jpeg(scene(40, (300, 400))), rotated(6), rotated(7)]
    expected = prepared(pillow, bodies)

    def no_fallback(*args, **kwargs):
        raise AssertionError("the batch fell back to Pillow")

    monkeypatch.setattr("segserve.decode.ImageFile.decode", no_fallback)
    batch = prepared(batched, bodies)
    assert not batch.answers and not batch.jpegs and [p.decoder for p in batch.plans.values()] == ["torchvision"] * 3
    for index in range(3):
        mine, theirs = batch.model_inputs[index], expected.model_inputs[index]
        plan = batch.plans[index]
        assert (plan.width, plan.height) == (expected.plans[index].width, expected.plans[index].height)
        assert mine.shape == (3, 256, 256) and mine.dtype == torch.float32
        assert mine.device == batched.segmenter.device
        # Two JPEG decoders and two antialiased resizes: within a few grey levels (std 0.25 -> 1 level = 0.016).
        assert (mine - theirs).abs().mean() < 0.05


def test_an_unexpected_failure_preparing_one_image_fails_only_that_request(segmenters, monkeypatch):
    _, batched = segmenters
    import segserve.pipeline as pipeline

    real = pipeline.tensor_to_model_input
    calls = iter(range(10))

    def second_fails(*args, **kwargs):
        if next(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "tensor_to_model_input", second_fails)
    bodies = [jpeg(scene(50 + i, (200, 240))) for i in range(3)]
    statuses = [s for s, _ in answers(batched, bodies)]
    assert statuses == [200, 500, 200]


def test_jpegs_without_an_end_marker_take_pillows_path(segmenters):
    """A truncated JPEG is planned for Pillow (which answers 400), never for the batched decoder: nvJPEG may
    decode one into a grey-filled image without an error."""
    from segserve.decode import ends_with_eoi

    _, batched = segmenters
    good = jpeg(scene(60, (200, 240)))
    assert ends_with_eoi(good) and ends_with_eoi(good + b"\x00\x00\n")
    assert not ends_with_eoi(good[:-1]) and not ends_with_eoi(good[: len(good) // 2])
    bodies = [good, good[: len(good) * 2 // 3], good]
    batch = prepared(batched, bodies)
    assert [p.decoder for p in batch.plans.values()] == ["torchvision", "pillow", "torchvision"]
    assert [s for s, _ in answers(batched, bodies)] == [200, 400, 200]


def test_a_failed_batched_decode_is_logged_and_counted(segmenters, monkeypatch, caplog):
    """When the batched decoder fails, Pillow answers each image, and the fallback is not silent."""
    pillow, batched = segmenters
    bodies = [jpeg(scene(70 + i, (200, 240))) for i in range(3)]

    def broken(*args, **kwargs):
        raise RuntimeError("nvjpegDecodeBatched failed (simulated)")

    monkeypatch.setattr("segserve.decode.decode_jpegs", broken)
    recorded = batched.context.metrics  # the RecordedMetrics load_handler gave the handler's context
    seen = len(recorded.named("segserve_decoder_fallbacks_total"))
    with caplog.at_level("WARNING", logger="segserve.pipeline"):
        got = answers(batched, bodies)
    assert [s for s, _ in got] == [200, 200, 200]
    for (_, a), (_, b) in zip(answers(pillow, bodies), got, strict=True):
        assert np.array_equal(a, b)  # Pillow decoded them all
    assert [m.value for m in recorded.named("segserve_decoder_fallbacks_total")[seen:]] == [3]
    assert "batched JPEG decode failed for 3 images (RuntimeError: nvjpegDecodeBatched failed" in caplog.text


def test_a_compiled_model_is_warmed_up_at_the_batch_size_too(config):
    """torch.compile recompiles at the second batch size it sees: the warm-up, not the first full batch, pays."""
    from segserve.pipeline import Segmenter

    shapes = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            shapes.append(x.shape[0])
            return torch.zeros(x.shape[0], 3, *x.shape[2:])

    Segmenter(dataclasses.replace(config, compile=True), Recorder()).warm_up(batch_size=4)
    Segmenter(dataclasses.replace(config, compile=False), Recorder()).warm_up(batch_size=4)
    assert shapes == [1, 4, 1]
