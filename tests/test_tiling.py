"""Sliding-window inference: the window grid, the blending weights, stitching, and quality on a large scene."""

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import encode_image, miou
from PIL import Image

from segserve.tiling import (
    blended_bands,
    gaussian_importance_map,
    should_tile,
    sliding_window_mask,
    sliding_window_probs,
    window_starts,
)
from segserve.tools.inprocess import Request, handle
from segserve.tools.synthetic import generate_scene

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.mark.parametrize("length, window, overlap", [(1000, 256, 0.25), (256, 256, 0.25), (257, 256, 0.5),
                                                     (100, 256, 0.25), (1000, 100, 0.0), (50, 7, 0.9)])
def test_window_starts_cover_the_line_and_end_flush(length, window, overlap):
    starts = window_starts(length, window, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert starts[-1] == max(0, length - window)  # the last window ends at the edge, never past it
    covered = np.zeros(length, int)
    for start in starts:
        covered[start:start + window] += 1
    assert covered.min() >= 1
    stride = max(1, int(window * (1 - overlap)))
    assert all(b - a == stride for a, b in zip(starts[:-1], starts[1:-1], strict=False))
    assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:], strict=False))


def window_grid(height, width, tile, overlap):
    """(top, left) of every window blended_bands runs, row by row."""
    return [(top, left) for top in window_starts(height, tile[0], overlap)
            for left in window_starts(width, tile[1], overlap)]


def test_window_grid_covers_every_pixel_with_the_configured_overlap():
    height, width, tile = 700, 1000, (256, 256)
    grid = window_grid(height, width, tile, 0.25)
    covered = np.zeros((height, width), int)
    for top, left in grid:
        assert 0 <= top <= height - tile[0] and 0 <= left <= width - tile[1]
        covered[top:top + tile[0], left:left + tile[1]] += 1
    assert covered.min() >= 1
    assert (grid[0], grid[1]) == ((0, 0), (0, 192))  # stride 256 x 0.75: 64 px shared with the neighbour
    assert covered[0, 192:256].min() == 2 and covered[0, 100] == 1


def test_gaussian_weights_are_positive_symmetric_and_peak_in_the_middle():
    weights = gaussian_importance_map((64, 96))
    assert weights.shape == (64, 96) and weights.dtype == np.float32
    assert weights.min() > 0 and weights.max() == pytest.approx(1)
    assert np.allclose(weights, weights[::-1]) and np.allclose(weights, weights[:, ::-1])
    assert weights[32, 48] > weights[32, 70] > weights[32, 95] and weights[0, 0] == weights.min()


def one_hot_image(height, width, seed=0):
    """Each pixel has one clearly brightest channel: argmax of the identity 'model' is its class."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 3, (height, width))
    pixels = np.eye(3, dtype=np.uint8)[classes] * 180 + rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels), classes


@pytest.mark.parametrize("size, tile, batch", [((101, 157), (32, 48), 3), ((20, 157), (32, 48), 8),
                                               ((64, 96), (32, 48), 1)])
def test_stitching_an_identity_model_gives_back_the_input(size, tile, batch):
    image, classes = one_hot_image(*size)
    mask = sliding_window_mask(image, lambda x: x.clone(), tile, 0.25, batch, MEAN, STD)
    assert mask.dtype == np.uint8 and np.array_equal(mask, classes)
    bands = list(blended_bands(image, lambda x: x.clone(), tile, 0.25, batch, MEAN, STD))
    assert [top for top, _ in bands] == sorted({top for top, _ in bands})
    logits = torch.cat([band for _, band in bands], 1)
    expected = (torch.from_numpy(np.array(image)).permute(2, 0, 1) / 255 - 0.5) / 0.25
    assert logits.shape == expected.shape and torch.allclose(logits, expected, atol=1e-5)
    probs = sliding_window_probs(image, lambda x: x.clone(), tile, 0.25, batch, MEAN, STD, channels=(0, 2))
    assert probs.dtype == np.float16 and probs.shape == (2, *size)
    assert np.allclose(probs.astype(np.float32), expected.softmax(0)[[0, 2]].numpy(), atol=1e-3)


def test_tiling_policy(config):
    tiling = replace(config.tiling, auto_above_pixels=1_000_000)
    config = replace(config, tiling=tiling)
    assert not should_tile(256, 256, "on", config)  # one window: the resize path, untouched
    assert should_tile(300, 200, "on", config) and not should_tile(300, 200, "auto", config)
    assert should_tile(1001, 1000, "auto", config) and not should_tile(1001, 1000, "off", config)


@pytest.mark.parametrize("size", [(256, 256), (200, 120), (1, 1)])
def test_an_image_that_fits_one_window_is_answered_exactly_as_untiled(reference, handler, size):
    image, _ = generate_scene(5, size)
    image = Image.fromarray(image)
    assert np.array_equal(reference.predict([image], tile="on")[0], reference.predict([image], tile="off")[0])
    data = {"data": encode_image(image)}
    for fmt in ("png", "probs"):
        answers = [handle(handler, [Request({**data, "format": fmt.encode(), "tile": mode})])[0]
                   for mode in (b"on", b"off")]
        assert answers[0].status == 200 and answers[0].body == answers[1].body


def test_tiled_beats_downscaling_on_a_large_scene_at_native_scale(reference):
    image, truth = generate_scene(3, (768, 640))
    image = Image.fromarray(image)
    tiled, downscaled = reference.predict([image], tile="on")[0], reference.predict([image], tile="off")[0]
    assert tiled.shape == truth.shape
    assert miou(tiled, truth) >= miou(downscaled, truth)
    assert miou(tiled, truth) > 0.85


def test_tiled_requests_in_a_batch_with_resized_ones(reference, handler):
    large, _ = generate_scene(4, (300, 520))
    small, _ = generate_scene(6, (128, 128))
    requests = [Request({"data": encode_image(Image.fromarray(large)), "format": b"png", "tile": b"on"}),
                Request({"data": encode_image(Image.fromarray(small)), "format": b"png"}),
                Request({"data": encode_image(Image.fromarray(large)), "format": b"probs", "tile": b"on"})]
    png, small_png, probs = handle(handler, requests)
    assert (png.status, small_png.status, probs.status) == (200, 200, 200)
    (expected,) = reference.predict([Image.fromarray(large)], tile="on")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.body))), expected)
    probs = np.load(io.BytesIO(probs.body))
    assert probs.shape == (3, 300, 520) and (probs.argmax(0) == expected).mean() > 0.999


def test_a_tiled_overlay_is_drawn_on_the_full_image_with_the_tiled_mask(reference, handler, config):
    from segserve.encoders import overlay_jpeg

    image = Image.fromarray(generate_scene(8, (300, 520))[0])
    (reply,) = handle(handler, [Request({"data": encode_image(image), "format": b"overlay", "tile": b"on"})])
    (mask,) = reference.predict([image], tile="on")
    assert reply.status == 200 and reply.body == overlay_jpeg(image, mask, config)
