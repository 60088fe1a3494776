"""The in-process pipeline: sizes, per-request errors in a batch, formats, without TorchServe."""

import io
import json

import numpy as np
import pytest
import torch
from conftest import encode_image, random_image
from PIL import Image
from torch import nn

from segserve.pipeline import Request, Segmenter
from segserve.transforms import logits_to_mask, to_model_input


class ChannelArgmax(nn.Module):
    """A stand-in 'model' whose answer is known: class = the brightest colour channel."""

    def forward(self, x):
        return x.clone()


def dominant_channel_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=(height // 8 + 1, width // 8 + 1)).repeat(8, 0).repeat(8, 1)[:height, :width]
    pixels = np.full((height, width, 3), 20, np.uint8)
    for c in range(3):
        pixels[..., c][labels == c] = 230
    return Image.fromarray(pixels), labels.astype(np.uint8)


@pytest.fixture()
def segmenter(config):
    return Segmenter(config, ChannelArgmax().eval())


def png_request(image, **inputs):
    return Request(inputs={"body": encode_image(image, "PNG"), **inputs})


def test_mask_matches_known_answer_at_model_size(segmenter, config):
    height, width = config.input_size
    image, labels = dominant_channel_image(width, height)
    (mask,) = segmenter.predict([image])
    assert np.array_equal(mask, labels)


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (257, 131), (640, 479), (1001, 333)])
def test_mask_size_equals_input_size(segmenter, size):
    (mask,) = segmenter.predict([random_image(*size)])
    assert mask.shape == (size[1], size[0]) and mask.dtype == np.uint8


def test_upsampled_mask_follows_large_regions(segmenter):
    image, labels = dominant_channel_image(640, 480, seed=1)
    image = image.resize((640, 480))
    big_labels = np.asarray(Image.fromarray(labels).resize((640, 480), Image.Resampling.NEAREST))
    (mask,) = segmenter.predict([Image.fromarray(np.asarray(image))])
    assert (mask == big_labels).mean() > 0.95


def test_batch_with_bad_requests_answers_each_on_its_own(segmenter):
    good_a, good_b = random_image(50, 40, seed=1), random_image(33, 77, seed=2)
    requests = [png_request(good_a), Request(inputs={"body": b""}), Request(inputs={"body": b"not an image"}),
                png_request(good_b, format=b"png")]
    responses = segmenter.handle_batch(requests)
    assert [r.status for r in responses] == [200, 400, 400, 200]
    assert json.loads(responses[1].body)["type"] == "empty_body"
    assert json.loads(responses[2].body)["type"] == "invalid_image"
    alone = segmenter.handle_batch([png_request(good_b, format=b"png")])[0]
    assert responses[3].body == alone.body
    assert responses[3].content_type == "image/png"
    assert Image.open(io.BytesIO(responses[3].body)).size == (33, 77)
    body = json.loads(responses[0].body)
    assert (body["width"], body["height"]) == (50, 40)


def test_json_nested_too_deep_fails_alone_in_its_batch(segmenter):
    # TorchServe could not parse it either, so it arrives as raw bytes declared application/json (test_fuzz.py).
    deep = b'{"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    requests = [Request(inputs={"body": deep}, headers={"body": {"content-type": "application/json"}}),
                png_request(random_image(20, 10))]
    responses = segmenter.handle_batch(requests)
    assert [r.status for r in responses] == [400, 200]
    assert "not valid JSON" in json.loads(responses[0].body)["message"]


def test_all_bad_batch_runs_no_forward(segmenter):
    responses = segmenter.handle_batch([Request(inputs={}), Request(inputs={"body": b"x"})])
    assert [r.status for r in responses] == [400, 400]
    assert all(set(json.loads(r.body)) == {"code", "type", "message"} for r in responses)


def test_unexpected_failure_is_a_500_for_that_request_only(segmenter, monkeypatch):
    import segserve.pipeline as pipeline

    original = pipeline.logits_to_mask
    calls = {"n": 0}

    def flaky(logits, height, width):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom at /secret/path")
        return original(logits, height, width)

    monkeypatch.setattr(pipeline, "logits_to_mask", flaky)
    responses = segmenter.handle_batch([png_request(random_image(8, 8)), png_request(random_image(9, 9))])
    assert [r.status for r in responses] == [500, 200]
    assert "/secret" not in responses[0].body.decode()


def test_to_model_input_normalizes(config):
    image = Image.new("RGB", (10, 20), (128, 0, 255))
    tensor = to_model_input(image, (6, 4), config.mean, config.std)
    assert tensor.shape == (3, 6, 4)
    expected = (torch.tensor([128, 0, 255]) / 255 - torch.tensor(config.mean)) / torch.tensor(config.std)
    assert torch.allclose(tensor[:, 0, 0], expected, atol=1e-5)


def test_logits_to_mask_rejects_bad_shape():
    with pytest.raises(ValueError):
        logits_to_mask(torch.zeros(1, 3, 4, 4), 4, 4)
