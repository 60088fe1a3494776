"""Open Inference Protocol v2 through the handler as TorchServe calls it: bodies built by tritonclient, answers
decoded by it, errors per request."""

import base64
import io
import json

import numpy as np
import pytest
from conftest import encode_image, random_image
from handlers import stand_in_handler
from PIL import Image
from test_pipeline import dominant_channel_image
from v2_client import HEADER_LENGTH, image_input, mask_output, parse, request_body

from segserve import v2
from segserve.errors import BadRequest
from segserve.tools.inprocess import Request, handle


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    """The handler on the ChannelArgmax stand-in (test_pipeline.py)."""
    return stand_in_handler(tmp_path_factory.mktemp("argmax"))


def as_torchserve_request(body: bytes, headers: dict[str, str]) -> Request:
    """What TorchServe hands the handler: a JSON body already parsed, anything else as bytes."""
    content_type = headers.get("Content-Type", "")
    value = json.loads(body) if content_type == "application/json" else body
    return Request({"body": value}, {**headers, "body": {"content-type": content_type}})


def answer(segmenter, body, headers):
    (response,) = handle(segmenter, [as_torchserve_request(body, headers)])
    return response


def known_image(width=120, height=70):
    return dominant_channel_image(width, height, seed=3)


@pytest.mark.parametrize("binary_in", [False, True])
@pytest.mark.parametrize("binary_out", [False, True])
def test_image_file_as_bytes_gives_the_mask_as_uint8(segmenter, binary_in, binary_out):
    image, labels = known_image()
    png = encode_image(image)
    tensor = image_input(png if binary_in else base64.b64encode(png).decode(), binary_in)
    response = answer(segmenter, *request_body(tensor, [mask_output(binary_out)], request_id="req-7"))
    assert response.status == 200, response.body
    result = parse(response.body, response.headers)
    mask = result.as_numpy("mask")
    assert mask.dtype == np.uint8 and mask.shape == (70, 120)
    assert np.array_equal(mask, labels)
    doc = result.get_response()
    assert doc["id"] == "req-7" and doc["model_name"] == "segmenter" and doc["model_version"] == "1.0"
    assert (HEADER_LENGTH in response.headers) == binary_out


@pytest.mark.parametrize("binary", [False, True])
def test_pixels_as_uint8_tensor(segmenter, binary):
    image, labels = known_image(64, 48)
    pixels = np.asarray(image)
    response = answer(segmenter, *request_body(image_input(pixels, binary), [mask_output(binary)]))
    assert response.status == 200, response.body
    assert np.array_equal(parse(response.body, response.headers).as_numpy("mask"), labels)
    batched = image_input(pixels[None], binary)  # [1, H, W, 3] is one image too
    assert answer(segmenter, *request_body(batched, [mask_output(binary)])).body == response.body


@pytest.mark.parametrize("binary", [False, True])
def test_png_format_parameter_gives_the_mask_png_as_bytes(segmenter, config, binary):
    image, labels = known_image()
    body, headers = request_body(image_input(encode_image(image), True), [mask_output(binary)],
                                 parameters={"format": "png"})
    response = answer(segmenter, body, headers)
    assert response.status == 200, response.body
    (element,) = parse(response.body, response.headers).as_numpy("mask")
    png = element if binary else base64.b64decode(element)
    mask = Image.open(io.BytesIO(png))
    assert mask.mode == "P" and mask.getpalette()[3:6] == list(config.classes[1].color)
    assert np.array_equal(np.asarray(mask), labels)


def test_tritonclient_default_asks_for_binary_output(segmenter):
    image, labels = known_image()
    body, headers = request_body(image_input(encode_image(image), True))  # no outputs named
    response = answer(segmenter, body, headers)
    assert response.content_type == "application/octet-stream" and HEADER_LENGTH in response.headers
    assert np.array_equal(parse(response.body, response.headers).as_numpy("mask"), labels)


def test_hand_written_json_with_output_parameters_and_classes(segmenter):
    image, labels = known_image()
    doc = {"id": "x", "parameters": {"classes": "nucleus"},
           "inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES",
                       "data": [base64.b64encode(encode_image(image)).decode()]}],
           "outputs": [{"name": "mask", "parameters": {"format": "png"}}]}
    response = answer(segmenter, json.dumps(doc).encode(), {"Content-Type": "application/json"})
    out = json.loads(response.body)["outputs"][0]
    assert out["datatype"] == "BYTES" and out["shape"] == [1]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["data"][0]))))
    assert np.array_equal(mask, np.where(labels == 2, 2, 0))


def test_v2_json_without_json_content_type_is_still_v2(segmenter):
    image, labels = known_image()
    body, _ = request_body(image_input(base64.b64encode(encode_image(image)).decode(), False))
    response = answer(segmenter, body, {"Content-Type": "application/octet-stream"})
    assert np.array_equal(parse(response.body, response.headers).as_numpy("mask"), labels)


def error(response):
    doc = json.loads(response.body)
    assert doc["error"] == doc["message"] and doc["code"] == response.status
    return doc


@pytest.mark.parametrize("make_tensor, status, kind", [
    (lambda: image_input(base64.b64encode(b"not an image").decode(), False), 400, "invalid_image"),
    (lambda: image_input("%%% not base64 %%%", False), 400, "invalid_image"),
    (lambda: image_input(np.zeros((4, 4), np.uint8), False), 422, "unprocessable_tensor"),
    (lambda: image_input(np.zeros((2, 4, 4, 3), np.uint8), True), 422, "unprocessable_tensor"),
])
def test_bad_tensors_get_v2_errors(segmenter, make_tensor, status, kind):
    response = answer(segmenter, *request_body(make_tensor(), request_id="bad-1"))
    assert response.status == status and response.content_type == "application/json"
    doc = error(response)
    assert doc["type"] == kind and doc["id"] == "bad-1"


def test_wrong_datatype_shape_count_and_parameters(segmenter):
    def send(doc):
        return answer(segmenter, json.dumps(doc).encode(), {"Content-Type": "application/json"})

    floats = {"inputs": [{"name": "i", "shape": [1, 1, 3], "datatype": "FP32", "data": [0.1, 0.2, 0.3]}]}
    assert send(floats).status == 422
    short = {"inputs": [{"name": "i", "shape": [2, 2, 3], "datatype": "UINT8", "data": [1, 2, 3]}]}
    assert send(short).status == 400 and "needs 12 values" in error(send(short))["message"]
    overflow = {"inputs": [{"name": "i", "shape": [1, 1, 3], "datatype": "UINT8", "data": [1, 2, 300]}]}
    assert send(overflow).status == 400
    two = {"inputs": [short["inputs"][0], short["inputs"][0]]}
    assert send(two).status == 422
    ok = {"inputs": [{"name": "i", "shape": [1, 1, 3], "datatype": "UINT8", "data": [1, 2, 3]}]}
    assert send({**ok, "parameters": {"format": "gif"}}).status == 400
    assert error(send({**ok, "parameters": {"colour": "red"}}))["type"] == "invalid_option"
    assert send({**ok, "outputs": [{"name": "logits"}]}).status == 400
    assert send(ok).status == 200


def test_too_many_pixels_is_413_before_reading_the_data(segmenter, config):
    side = int(config.limits.max_pixels ** 0.5) + 1
    doc = {"inputs": [{"name": "i", "shape": [side, side, 3], "datatype": "UINT8", "data": [0]}]}
    response = answer(segmenter, json.dumps(doc).encode(), {"Content-Type": "application/json"})
    assert response.status == 413 and error(response)["type"] == "image_too_large"


def test_bad_binary_header_length_is_a_400(segmenter):
    body, headers = request_body(image_input(encode_image(random_image(8, 8)), True))
    response = answer(segmenter, body, {**headers, HEADER_LENGTH: str(len(body) + 5)})
    assert response.status == 400 and "Inference-Header-Content-Length" in error(response)["message"]


def test_v2_and_plain_requests_in_one_batch_each_get_their_own_answer(segmenter):
    image, labels = known_image()
    good = as_torchserve_request(*request_body(image_input(encode_image(image), True), [mask_output(False)]))
    bad = as_torchserve_request(*request_body(image_input(b"junk", True), request_id="bad"))
    plain = Request({"body": encode_image(image)})
    responses = handle(segmenter, [good, bad, plain, good])
    assert [r.status for r in responses] == [200, 400, 200, 200]
    assert np.array_equal(parse(responses[0].body, {}).as_numpy("mask"), labels)
    assert responses[3].body == responses[0].body
    assert error(responses[1])["id"] == "bad"
    assert json.loads(responses[2].body)["width"] == 120  # the segserve JSON answer, not v2


def test_plain_bodies_are_not_v2():
    assert not v2.is_v2({"body": {"image": "abc"}}, {})
    assert not v2.is_v2({"body": b"\x89PNG..."}, {})
    assert not v2.is_v2({"body": b"{not json"}, {})
    assert v2.is_v2({"body": {"inputs": []}}, {})
    assert v2.is_v2({"body": b"xx"}, {HEADER_LENGTH.lower(): "2"})


def test_json_nested_too_deep_for_the_parser_is_a_400_not_a_crash():
    # Found by tests/test_fuzz.py: json.loads raises RecursionError (not ValueError) here.
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert not v2.is_v2({"body": deep}, {})
    with pytest.raises(BadRequest, match="not valid JSON"):
        v2.split_body({"body": deep}, {HEADER_LENGTH.lower(): str(len(deep))})
