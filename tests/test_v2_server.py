"""Integration: Open Inference Protocol v2 bodies from tritonclient against a real TorchServe, batched."""

from __future__ import annotations

import base64
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image
from support import MODEL, encode_image
from v2_client import HEADER_LENGTH, image_input, mask_output, parse, request_body

from segserve.tools.synthetic import generate_scene

pytestmark = pytest.mark.integration


def post(server, path: str, body: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(f"{server.inference_url}{path}", data=body, headers={**server.headers(), **headers},
                         timeout=120)


@pytest.mark.parametrize("path", [f"/predictions/{MODEL}", f"/v2/models/{MODEL}/infer"])
def test_v2_request_on_both_paths(server, reference, path):
    image, _ = generate_scene(41, (200, 150))
    body, headers = request_body(image_input(encode_image(Image.fromarray(image)), True), [mask_output(True)],
                                 request_id="one")
    response = post(server, path, body, headers)
    assert response.status_code == 200, response.text[:300]
    assert HEADER_LENGTH.lower() in {k.lower() for k in response.headers}
    result = parse(response.content, response.headers)
    assert result.get_response()["id"] == "one"
    (expected,) = reference.predict([Image.fromarray(image)])
    assert np.array_equal(result.as_numpy("mask"), expected)


def test_concurrent_v2_requests_are_batched_and_each_answered(server, reference):
    """JSON and binary bodies, file bytes and pixel tensors, mixed in one burst: TorchServe batches them."""
    images = [generate_scene(200 + i, (160, 120))[0] for i in range(16)]
    bodies = []
    for i, pixels in enumerate(images):
        data = pixels if i % 2 else encode_image(Image.fromarray(pixels))
        binary = i % 4 < 2
        if not binary and not isinstance(data, np.ndarray):
            data = base64.b64encode(data).decode()
        bodies.append(request_body(image_input(data, binary), [mask_output(binary)], request_id=str(i)))
    log = server.log_dir / "model_log.log"
    before = log.read_text(errors="replace") if log.exists() else ""
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda b: post(server, f"/predictions/{MODEL}", *b), bodies))
    expected = reference.predict([Image.fromarray(image) for image in images])
    for i, (response, mask) in enumerate(zip(responses, expected, strict=True)):
        assert response.status_code == 200, response.text[:300]
        result = parse(response.content, response.headers)
        assert result.get_response()["id"] == str(i)
        assert np.array_equal(result.as_numpy("mask"), mask), f"request {i}"
    new_lines = log.read_text(errors="replace")[len(before):]
    sizes = [int(n) for n in re.findall(r"segserve batch: (\d+) requests", new_lines)]
    assert sum(sizes) >= 16 and max(sizes) > 1, f"TorchServe never batched the v2 requests: batch sizes {sizes}"


def test_v2_errors_keep_their_status_and_are_readable_by_v2_clients(server):
    good = request_body(image_input(encode_image(Image.fromarray(generate_scene(5, (64, 64))[0])), True))
    bad = request_body(image_input(b"not an image", True), request_id="bad")
    floats = (b'{"inputs": [{"name": "i", "shape": [1, 1, 3], "datatype": "FP32", "data": [0.1, 0.2, 0.3]}]}',
              {"Content-Type": "application/json"})
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda b: post(server, f"/predictions/{MODEL}", *b), [good, bad, floats]))
    assert [r.status_code for r in responses] == [200, 400, 422]
    assert responses[1].json()["id"] == "bad" and responses[1].json()["type"] == "invalid_image"
    assert responses[2].json()["error"] == responses[2].json()["message"]
