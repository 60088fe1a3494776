"""Integration: a real TorchServe with the built archive, on free loopback ports, over HTTP."""

from __future__ import annotations

import base64
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from support import MODEL, encode_image, random_image

from segserve.tools.synthetic import generate_scene

pytestmark = pytest.mark.integration

def predict(server, body: bytes, headers: dict | None = None, **kwargs) -> requests.Response:
    return requests.post(f"{server.inference_url}/predictions/{MODEL}", data=body,
                         headers={**server.headers(), **(headers or {})}, timeout=120, **kwargs)


def png_mask(content: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(content))
    assert image.mode == "P"
    return np.asarray(image)


def scene_png(seed: int, size=(256, 256)) -> tuple[bytes, np.ndarray]:
    image, mask = generate_scene(seed, size)
    return encode_image(Image.fromarray(image)), mask


def test_ping_needs_token_and_reports_healthy(server):
    assert requests.get(f"{server.inference_url}/ping", timeout=10).status_code in (400, 401)
    response = requests.get(f"{server.inference_url}/ping", headers=server.headers(), timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "Healthy"


def test_inference_refuses_missing_or_wrong_token(server):
    body, _ = scene_png(1)
    url = f"{server.inference_url}/predictions/{MODEL}"
    assert requests.post(url, data=body, timeout=30).status_code in (400, 401)
    wrong = requests.post(url, data=body, headers={"Authorization": "Bearer not-the-key"}, timeout=30)
    assert wrong.status_code in (400, 401)


def test_json_prediction_segments_a_scene(server, config):
    body, truth = scene_png(7)
    response = predict(server, body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    doc = response.json()
    assert doc["model"] == MODEL and doc["version"] == config.version
    assert (doc["width"], doc["height"]) == (256, 256)
    assert [c["name"] for c in doc["classes"]] == config.class_names
    mask = png_mask(base64.b64decode(doc["mask"]))
    assert mask.shape == truth.shape
    counts = np.bincount(mask.ravel(), minlength=3)
    assert [c["pixels"] for c in doc["classes"]] == counts.tolist()
    # A real segmentation, not a constant: most pixels agree with the generated truth.
    assert (mask == truth).mean() > 0.9


def test_png_prediction_with_accept_header(server, config):
    body, _ = scene_png(8)
    response = predict(server, body, {"Accept": "image/png"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.size == (256, 256) and image.mode == "P"
    assert image.getpalette()[3:6] == list(config.classes[1].color)


@pytest.mark.parametrize("width, height", [(1, 1), (3, 5), (257, 131), (640, 479)])
def test_mask_size_equals_input_size(server, width, height):
    response = predict(server, encode_image(random_image(width, height, seed=width)), {"Accept": "image/png"})
    assert response.status_code == 200
    assert png_mask(response.content).shape == (height, width)


def test_served_mask_equals_in_process_pipeline(server, reference):
    for seed, size in [(11, (256, 256)), (12, (300, 411)), (13, (97, 133))]:
        image, _ = generate_scene(seed, size)
        served = png_mask(predict(server, encode_image(Image.fromarray(image)), {"Accept": "image/png"}).content)
        (local,) = reference.predict([Image.fromarray(image)])
        assert np.array_equal(served, local), f"seed {seed}: {(served != local).sum()} pixels differ"


def test_multipart_and_json_bodies(server):
    body, _ = scene_png(14)
    expected = predict(server, body, {"Accept": "image/png"}).content
    for field in ("data", "file"):
        response = requests.post(f"{server.inference_url}/predictions/{MODEL}", headers=server.headers(),
                                 files={field: ("x.png", body, "image/png")}, data={"format": "png"}, timeout=60)
        assert response.status_code == 200 and response.content == expected
    doc = {"image": base64.b64encode(body).decode(), "format": "png"}
    response = predict(server, json.dumps(doc).encode(), {"Content-Type": "application/json"})
    assert response.status_code == 200 and response.content == expected


def test_concurrent_requests_are_batched_and_each_answered_correctly(server, reference):
    images = [generate_scene(100 + i, (256, 256))[0] for i in range(16)]
    bodies = [encode_image(Image.fromarray(image)) for image in images]
    log = server.log_dir / "model_log.log"
    before = log.read_text(errors="replace") if log.exists() else ""
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda b: predict(server, b, {"Accept": "image/png"}), bodies))
    assert all(r.status_code == 200 for r in responses)
    expected = reference.predict([Image.fromarray(image) for image in images])
    for response, mask in zip(responses, expected, strict=True):
        assert np.array_equal(png_mask(response.content), mask)
    new_lines = log.read_text(errors="replace")[len(before):]
    sizes = [int(n) for n in re.findall(r"segserve batch: (\d+) requests", new_lines)]
    assert sum(sizes) >= 16 and max(sizes) > 1, f"TorchServe never batched: batch sizes {sizes}"


def test_bad_input_gets_json_4xx_while_concurrent_good_request_succeeds(server):
    good, _ = scene_png(21)
    cases = [b"", b"this is not an image", encode_image(random_image(64, 64))[:200], good]
    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(lambda b: predict(server, b, {"Content-Type": "application/octet-stream"}),
                                  cases))
    for response in responses[:3]:
        assert response.status_code == 400, response.text
        error = response.json()
        assert set(error) == {"code", "type", "message"} and error["code"] == 400
        assert "Traceback" not in error["message"] and "/" not in error["message"].replace("image/", "")
    assert responses[3].status_code == 200 and responses[3].json()["width"] == 256


def test_unknown_format_is_a_400_naming_the_choices(server):
    body, _ = scene_png(22)
    response = requests.post(f"{server.inference_url}/predictions/{MODEL}", headers=server.headers(),
                             files={"data": ("x.png", body, "image/png")}, data={"format": "gif"}, timeout=60)
    assert response.status_code == 400
    assert response.json()["type"] == "invalid_option" and "png" in response.json()["message"]


def test_scale_workers_up_and_down(server):
    url = f"{server.management_url}/models/{MODEL}"
    headers = server.headers("management")
    up = requests.put(url, params={"min_worker": 2, "synchronous": "true"}, headers=headers, timeout=240)
    assert up.status_code == 200, up.text
    server.wait_ready(MODEL, workers=2, timeout=240)
    body, _ = scene_png(31)
    with ThreadPoolExecutor(4) as pool:
        assert all(r.status_code == 200 for r in pool.map(lambda _: predict(server, body), range(4)))
    down = requests.put(url, params={"min_worker": 1, "max_worker": 1, "synchronous": "true"}, headers=headers,
                        timeout=240)
    assert down.status_code == 200, down.text
    workers = requests.get(url, headers=headers, timeout=30).json()[0]["workers"]
    assert len(workers) == 1
    assert predict(server, body).status_code == 200


def test_model_registration_api_is_off(server):
    response = requests.post(f"{server.management_url}/models", params={"url": f"{MODEL}.mar"},
                             headers=server.headers("management"), timeout=30)
    assert response.status_code == 405


def test_describe_shows_classes(server, config):
    response = requests.get(f"{server.management_url}/models/{MODEL}", params={"customized": "true"},
                            headers=server.headers("management"), timeout=60)
    assert response.status_code == 200
    custom = response.json()[0].get("customizedMetadata")
    assert custom, response.text
    custom = json.loads(custom) if isinstance(custom, str) else custom
    assert [c["name"] for c in custom["classes"]] == config.class_names


def test_metrics_endpoint_serves_prometheus_text(server):
    response = requests.get(f"{server.metrics_url}/metrics", timeout=30)
    assert response.status_code == 200
    assert "ts_inference_requests_total" in response.text or "Requests2XX" in response.text


def test_server_binds_loopback_only(server):
    text = Path(server.workdir / "config.properties").read_text()
    for key in ("inference_address", "management_address", "metrics_address"):
        assert re.search(rf"^{key}=http://127\.0\.0\.1:\d+$", text, re.M)
