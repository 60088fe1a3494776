"""KServe v1 (`{"instances": [{"b64": ...}]}` -> `{"predictions": [...]}`), through the handler as TorchServe calls
it, and once through a real TorchServe at KServe's v1 path."""

from __future__ import annotations

import base64
import dataclasses
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image
from support import MODEL, encode_image
from support.handlers import ask

from segserve.config import Limits
from segserve.tools.inprocess import Request, handle
from segserve.tools.synthetic import generate_scene

JSON = {"body": {"content-type": "application/json"}}


def scene(seed: int, size=(96, 128)) -> bytes:
    return encode_image(Image.fromarray(generate_scene(seed, size)[0]))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def alone(handler, image: bytes, **options) -> bytes:
    """The answer to the image sent as a request of its own."""
    reply = ask(handler, {"body": {"image": b64(image), **options}}, JSON)
    assert reply.status == 200, reply.body
    return reply.body


def v1(handler, body, headers=JSON):
    return ask(handler, {"body": body}, headers)


def error_of(reply, status: int, kind: str) -> str:
    assert reply.status == status, reply.body
    doc = json.loads(reply.body)
    assert set(doc) == {"code", "type", "message"} and (doc["code"], doc["type"]) == (status, kind)
    return doc["message"]


def test_each_instance_gets_the_answer_it_would_get_alone_in_order(handler):
    images = [scene(1), scene(2, (70, 50))]
    reply = v1(handler, {"instances": [{"b64": b64(images[0])}, {"image_bytes": {"b64": b64(images[1])}}]})
    assert reply.status == 200 and reply.content_type == "application/json"
    predictions = json.loads(reply.body)["predictions"]
    assert predictions == [json.loads(alone(handler, image)) for image in images]


def test_binary_formats_come_as_b64_and_options_apply_to_every_instance(handler):
    images = [scene(3), scene(4)]
    reply = v1(handler, {"instances": [{"data": b64(image)} for image in images], "format": "png",
                         "classes": "nucleus"})
    predictions = json.loads(reply.body)["predictions"]
    assert [p["content_type"] for p in predictions] == ["image/png", "image/png"]
    for prediction, image in zip(predictions, images, strict=True):
        served = np.asarray(Image.open(io.BytesIO(alone(handler, image, format="png", classes="nucleus"))))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(prediction["b64"])))), served)


def test_a_v1_body_sent_without_a_json_content_type_is_still_v1(handler):
    image = scene(5)
    body = json.dumps({"instances": [{"b64": b64(image)}], "format": "rle"}).encode()
    reply = v1(handler, body, {"body": {"content-type": "application/octet-stream"}})
    assert json.loads(reply.body)["predictions"] == [json.loads(alone(handler, image, format="rle"))]


@pytest.mark.parametrize("body, status, kind, says", [
    ({"instances": []}, 400, "bad_request", '"instances" must be a non-empty list'),
    ({"instances": {"b64": "x"}}, 400, "bad_request", '"instances" must be a non-empty list'),
    ({"instances": ["iVBORw0KGgo="]}, 400, "bad_request", "instances[0] is not an image"),
    ({"instances": [{"b64": "x", "format": "png"}]}, 400, "bad_request", "instances[0] is not an image"),
    ({"instances": [{"image_bytes": {"b64": "x", "size": 3}}]}, 400, "bad_request", "image_bytes takes only b64"),
    ({"instances": [{"b64": ""}]}, 400, "bad_request", "instances[0]: the image must be a non-empty base64"),
    ({"instances": [{"b64": "x"}], "image": "x"}, 400, "bad_request", 'in "instances" only'),
    ({"instances": [{"b64": "x"}], "inputs": []}, 400, "bad_request", 'in "instances" only'),
    ({"instances": [{"b64": "x"}] * (Limits.max_v1_instances + 1)}, 413, "limit_exceeded", "max_v1_instances"),
])
def test_malformed_v1_bodies_are_refused_saying_how_to_send_them(handler, body, status, kind, says):
    assert says in error_of(v1(handler, body), status, kind)


def test_a_bad_instance_fails_the_request_naming_its_index(handler):
    good = b64(scene(6))
    broken = b64(b"not an image at all")
    message = error_of(v1(handler, {"instances": [{"b64": good}, {"b64": broken}]}), 400, "invalid_image")
    assert message.startswith("instances[1]: ")
    message = error_of(v1(handler, {"instances": [{"b64": good}], "colour": "red"}), 400, "invalid_option")
    assert message.startswith("instances[0]: unknown option 'colour'")


def test_the_answers_put_together_are_held_to_the_response_limit(handler, monkeypatch):
    limits = handler.segmenter.config.limits
    image = scene(7)
    size = len(json.dumps({"predictions": [json.loads(alone(handler, image))] * 2}, separators=(",", ":")))
    small = dataclasses.replace(handler.segmenter.config, limits=dataclasses.replace(limits,
                                                                                     max_response_bytes=size - 1))
    monkeypatch.setattr(handler.segmenter, "config", small)
    monkeypatch.setattr(handler.segmenter.planner, "config", small)
    message = error_of(v1(handler, {"instances": [{"b64": b64(image)}] * 2}), 413, "response_too_large")
    assert "send fewer instances" in message


def test_v1_requests_share_a_batch_with_others_and_fail_alone(handler):
    image = scene(8)
    replies = handle(handler, [
        Request({"body": {"instances": [{"b64": b64(image)}, {"b64": b64(image)}], "format": "png"}}, JSON),
        Request({"body": image}, {"body": {"content-type": "image/png"}, "accept": "image/png"}),
        Request({"body": {"instances": [{"b64": "broken"}]}}, JSON),
        Request({"body": {"instances": "no"}}, JSON),
        Request({"body": image}, {"body": {"content-type": "image/png"}}),
    ])
    assert [r.status for r in replies] == [200, 200, 400, 400, 200]
    served = alone(handler, image, format="png")
    assert [base64.b64decode(p["b64"]) for p in json.loads(replies[0].body)["predictions"]] == [served, served]
    assert replies[1].body == served and replies[1].content_type == "image/png"
    assert json.loads(replies[4].body) == json.loads(alone(handler, image))


@pytest.mark.integration
def test_kserve_v1_path_through_torchserve(server):
    image = scene(9)
    response = requests.post(f"{server.inference_url}/v1/models/{MODEL}:predict", headers=server.headers(),
                             json={"instances": [{"b64": b64(image)}, {"b64": b64(image)}], "format": "png"},
                             timeout=120)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    alone_png = requests.post(f"{server.inference_url}/predictions/{MODEL}", headers=server.headers(),
                              files={"data": ("a.png", image)}, data={"format": "png"}, timeout=120).content
    assert [base64.b64decode(p["b64"]) for p in predictions] == [alone_png, alone_png]
    refused = requests.post(f"{server.inference_url}/v1/models/{MODEL}:predict", headers=server.headers(),
                            json={"instances": [{"b64": b64(image)}, {"b64": "broken"}]}, timeout=120)
    assert refused.status_code == 400 and refused.json()["message"].startswith("instances[1]: ")
