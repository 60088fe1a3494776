"""The request path through segmenter_handler.py, called in-process as TorchServe calls it (handler.handle):
sizes, per-request errors in a batch, statuses and content types on the context, each request's plan."""

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from support import encode_image, random_image
from support.handlers import ask, stand_in_handler

from segserve import formats
from segserve.config import ServingConfig
from segserve.decode import ImageFile
from segserve.metrics import STAGE_SECONDS
from segserve.plan import MASK, PILLOW, PROBS, TORCHVISION, Planner
from segserve.tools.inprocess import Request, handle
from segserve.transforms import logits_to_mask, to_model_input


def dominant_channel_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=(height // 8 + 1, width // 8 + 1)).repeat(8, 0).repeat(8, 1)[:height, :width]
    pixels = np.full((height, width, 3), 20, np.uint8)
    for c in range(3):
        pixels[..., c][labels == c] = 230
    return Image.fromarray(pixels), labels.astype(np.uint8)


@pytest.fixture(scope="module")
def argmax(tmp_path_factory):
    """The handler on the ChannelArgmax stand-in, loaded from a model directory like an unpacked archive."""
    return stand_in_handler(tmp_path_factory.mktemp("argmax"))


def png_request(image, headers=None, **inputs):
    return Request({"body": encode_image(image, "PNG"), **inputs}, headers or {})


def test_mask_matches_known_answer_at_model_size(argmax, config):
    height, width = config.input_size
    image, labels = dominant_channel_image(width, height)
    (mask,) = argmax.segmenter.predict([image])
    assert np.array_equal(mask, labels)
    png = ask(argmax, {"body": encode_image(image)}, {"Accept": "image/png"})
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.body))), labels)


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (257, 131), (640, 479), (1001, 333)])
def test_mask_size_equals_input_size(argmax, size):
    (mask,) = argmax.segmenter.predict([random_image(*size)])
    assert mask.shape == (size[1], size[0]) and mask.dtype == np.uint8
    reply = ask(argmax, {"body": encode_image(random_image(*size)), "format": b"png"})
    assert Image.open(io.BytesIO(reply.body)).size == size


def test_upsampled_mask_follows_large_regions(argmax):
    image, labels = dominant_channel_image(640, 480, seed=1)
    big_labels = np.asarray(Image.fromarray(labels).resize((640, 480), Image.Resampling.NEAREST))
    (mask,) = argmax.segmenter.predict([Image.fromarray(np.asarray(image))])
    assert (mask == big_labels).mean() > 0.95


def test_batch_with_bad_requests_answers_each_on_its_own(argmax):
    good_a, good_b = random_image(50, 40, seed=1), random_image(33, 77, seed=2)
    requests = [png_request(good_a), Request({"body": b""}), Request({"body": b"not an image"}),
                png_request(good_b, format=b"png")]
    replies = handle(argmax, requests)
    assert [r.status for r in replies] == [200, 400, 400, 200]
    assert [r.phrase for r in replies] == ["OK", "Bad Request", "Bad Request", "OK"]
    assert [r.content_type for r in replies] == ["application/json", "application/json", "application/json",
                                                 "image/png"]
    assert json.loads(replies[1].body)["type"] == "empty_body"
    assert json.loads(replies[2].body)["type"] == "invalid_image"
    alone = ask(argmax, png_request(good_b, format=b"png").inputs)
    assert replies[3].body == alone.body
    assert Image.open(io.BytesIO(replies[3].body)).size == (33, 77)
    body = json.loads(replies[0].body)
    assert (body["width"], body["height"]) == (50, 40)


def test_json_nested_too_deep_fails_alone_in_its_batch(argmax):
    # TorchServe could not parse it either, so it arrives as raw bytes declared application/json (test_fuzz.py).
    deep = b'{"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    replies = handle(argmax, [Request({"body": deep}, {"body": {"content-type": "application/json"}}),
                              png_request(random_image(20, 10))])
    assert [r.status for r in replies] == [400, 200]
    assert "not valid JSON" in json.loads(replies[0].body)["message"]


def test_all_bad_batch_runs_no_forward(argmax):
    forwards = len(argmax.context.metrics.named(STAGE_SECONDS, stage="forward"))
    replies = handle(argmax, [Request({}), Request({"body": b"x"})])
    assert [r.status for r in replies] == [400, 400]
    assert all(set(json.loads(r.body)) == {"code", "type", "message"} for r in replies)
    assert len(argmax.context.metrics.named(STAGE_SECONDS, stage="forward")) == forwards


def test_unexpected_failure_is_a_500_for_that_request_only(argmax, monkeypatch):
    import segserve.heads as heads

    original = heads.logits_to_mask
    calls = {"n": 0}

    def flaky(logits, height, width):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom at /secret/path")
        return original(logits, height, width)

    monkeypatch.setattr(heads, "logits_to_mask", flaky)
    replies = handle(argmax, [png_request(random_image(8, 8)), png_request(random_image(9, 9))])
    assert [r.status for r in replies] == [500, 200]
    assert replies[0].phrase == "Internal Server Error"
    assert "/secret" not in replies[0].body.decode()


def test_an_unexpected_failure_while_encoding_is_a_500_for_that_request_only(argmax, monkeypatch):
    def broken(_job):
        raise RuntimeError("boom at /secret/path")

    monkeypatch.setitem(formats.REGISTRY, "rle", dataclasses.replace(formats.REGISTRY["rle"], encode=broken))
    replies = handle(argmax, [png_request(random_image(8, 8), format=b"rle"), png_request(random_image(9, 9))])
    assert [r.status for r in replies] == [500, 200]
    assert json.loads(replies[0].body) == {"code": 500, "type": "internal_error",
                                           "message": "the mask could not be encoded"}


def test_describe_answers_the_model_card_keys(argmax, config):
    (reply,) = handle(argmax, [Request({"body": b""}, {"describe": "True"})])
    card = json.loads(reply.body)
    assert set(card) == {"model", "version", "family", "arch", "file", "head", "postprocess", "input_size", "classes"}
    assert card["head"] == "softmax" and "threshold" not in card["postprocess"] and card["postprocess"]["smooth"] == 0
    assert card["input_size"] == list(config.input_size) and card["arch"] == "torchscript"
    assert card["family"] == "torchscript" and card["file"] == "model.pt"  # the stand-in's weights file


def test_stage_metrics_reach_the_context_with_the_request_slot(argmax):
    metrics = argmax.context.metrics
    before = len(metrics.records)
    handle(argmax, [png_request(random_image(12, 10)), Request({"body": b"junk"})])
    new = metrics.records[before:]
    assert [(m.name, m.dimensions, m.index) for m in new if m.name != STAGE_SECONDS] == [
        ("segserve_images_total", {}, 0), ("segserve_pixels_total", {}, 0),
        ("segserve_errors_total", {"type": "invalid_image", "status": "400"}, 1), ("HandlerTime", {}, None)]
    assert [m.value for m in new if m.name == "segserve_pixels_total"] == [120]


def test_to_model_input_normalizes(config):
    image = Image.new("RGB", (10, 20), (128, 0, 255))
    tensor = to_model_input(image, (6, 4), config.mean, config.std)
    assert tensor.shape == (3, 6, 4)
    expected = (torch.tensor([128, 0, 255]) / 255 - torch.tensor(config.mean)) / torch.tensor(config.std)
    assert torch.allclose(tensor[:, 0, 0], expected, atol=1e-5)


def test_logits_to_mask_rejects_bad_shape():
    with pytest.raises(ValueError):
        logits_to_mask(torch.zeros(1, 3, 4, 4), 4, 4)


# -- the plan: decided once, from the request and the image header -------------------------------
def jpeg(image, **params):
    return encode_image(image, "JPEG", quality=90, **params)


def plan_of(config: ServingConfig, inputs, headers=None, device="cpu", is_v2=False):
    return Planner(config, device).plan(0, "req-1", inputs, headers or {}, is_v2)


def test_plans_for_each_kind_of_request(config):
    small, large = random_image(300, 200), random_image(1100, 1000)
    plan, source = plan_of(config, {"body": encode_image(small)})
    assert (plan.protocol, plan.tiled, plan.decoder, plan.reduce, plan.output, plan.keep_image) == \
        ("rest", False, PILLOW, True, MASK, False)
    assert (plan.width, plan.height, plan.format.name) == (300, 200, "json") and isinstance(source, ImageFile)
    plan, _ = plan_of(config, {"body": encode_image(large)})  # over auto_above_pixels: windows at its own scale
    assert (plan.tiled, plan.reduce) == (True, False)
    plan, _ = plan_of(config, {"body": encode_image(large), "tile": b"off"})
    assert (plan.tiled, plan.reduce) == (False, True)
    plan, _ = plan_of(config, {"body": encode_image(small), "format": b"overlay"})  # drawn on the full image
    assert (plan.keep_image, plan.reduce, plan.output, plan.format.content_type) == (True, False, MASK, "image/jpeg")
    plan, _ = plan_of(config, {"body": encode_image(small)}, {"Accept": "application/x-npy"})
    assert (plan.output, plan.format.name) == (PROBS, "probs")
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.tiled = True


def test_the_batched_jpeg_decoder_is_planned_for_resized_rgb_jpegs_only(config):
    on_gpu = dict(device="cuda:0")
    assert plan_of(config, {"body": jpeg(random_image(300, 200))}, **on_gpu)[0].decoder == TORCHVISION
    assert plan_of(config, {"body": jpeg(random_image(300, 200).convert("L"))}, **on_gpu)[0].decoder == TORCHVISION
    for inputs in ({"body": jpeg(random_image(300, 200).convert("CMYK"))},  # torchvision's colours differ
                   {"body": encode_image(random_image(300, 200))},  # not a JPEG
                   {"body": jpeg(random_image(300, 200)), "tile": b"on"},  # windows are cut from a PIL image
                   {"body": jpeg(random_image(300, 200)), "format": b"overlay"}):  # drawn on the full image
        assert plan_of(config, inputs, **on_gpu)[0].decoder == PILLOW, inputs
    assert plan_of(config, {"body": jpeg(random_image(300, 200))})[0].decoder == PILLOW  # auto on the CPU


def test_the_plan_sees_the_upright_size_before_decoding(config):
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter: 200 wide, 300 high
    plan, source = plan_of(config, {"body": jpeg(random_image(300, 200), exif=exif)})
    assert (plan.width, plan.height) == (200, 300)
    assert source.decode().size == (200, 300)


def test_v2_plans_resize_the_full_image_and_answer_a_mask(config):
    import base64

    doc = {"id": "a", "inputs": [{"name": "i", "shape": [1], "datatype": "BYTES",
                                  "data": [base64.b64encode(jpeg(random_image(1100, 1000))).decode()]}]}
    plan, _ = plan_of(config, {"body": doc}, is_v2=True)
    assert (plan.protocol, plan.tiled, plan.reduce, plan.output, plan.format, plan.v2.id) == \
        ("v2", False, False, MASK, None, "a")


def test_probs_over_the_response_limit_is_refused_from_the_header(config):
    limited = dataclasses.replace(config, limits=dataclasses.replace(config.limits, max_response_bytes=3 * 64 * 64 * 2))
    image = encode_image(random_image(64, 64))
    assert plan_of(limited, {"body": image, "format": b"probs"})[0].output == PROBS  # 3 classes x 64 x 64 x 2: at it
    from segserve.errors import PayloadTooLarge

    with pytest.raises(PayloadTooLarge, match=r"format=probs for this 65x64 image would be 24960 bytes"):
        plan_of(limited, {"body": encode_image(random_image(65, 64)), "format": b"probs"})
    assert plan_of(limited, {"body": encode_image(random_image(65, 64)), "format": b"probs", "classes": b"1"})
    assert plan_of(limited, {"body": encode_image(random_image(650, 640)), "format": b"png"})  # not capped

