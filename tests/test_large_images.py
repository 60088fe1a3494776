"""Integration: a large image through the real server, tiled, in every format; and the pixel limit."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image
from pycocotools import mask as coco_mask
from support import MODEL, encode_image, miou

from segserve.client import SegservClient
from segserve.tools.synthetic import generate_scene

pytestmark = pytest.mark.integration

# 1.26 Mpx: over the default auto_above_pixels (1 Mpx), so tile=auto takes the sliding windows (5 x 7 of them).
SIZE = (900, 1400)


@pytest.fixture(scope="module")
def large_scene():
    image, truth = generate_scene(2024, SIZE)
    return Image.fromarray(image), truth


def ask(server, body: bytes, **fields) -> requests.Response:
    return requests.post(f"{server.inference_url}/predictions/{MODEL}", headers=server.headers(),
                         files={"data": ("scene.png", body, "image/png")}, data=fields, timeout=120)



def test_large_image_is_tiled_by_default(server, reference, large_scene):
    image, truth = large_scene
    (expected,) = reference.predict([image])  # tile=auto, in process
    (downscaled,) = reference.predict([image], tile="off")
    png = ask(server, encode_image(image), format="png")
    assert png.status_code == 200, png.text
    mask = np.asarray(Image.open(io.BytesIO(png.content)))
    assert mask.shape == SIZE and np.array_equal(mask, expected)
    assert miou(mask, truth) > 0.9 and miou(mask, truth) >= miou(downscaled, truth)


def test_every_format_tiled(server, reference):
    # Smaller than auto's threshold (so cheaper), tiled on request: 3 x 4 windows.
    image = Image.fromarray(generate_scene(2026, (600, 800))[0])
    body = encode_image(image)
    (mask,) = reference.predict([image], tile="on")

    doc = ask(server, body, tile="on").json()
    assert (doc["width"], doc["height"]) == image.size
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(doc["mask"])))), mask)
    assert [c["pixels"] for c in doc["classes"]] == np.bincount(mask.ravel(), minlength=3).tolist()

    rle = ask(server, body, format="rle", classes="nucleus", tile="on").json()["classes"][0]["rle"]
    decoded = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), mask == 2)

    polygons = ask(server, body, format="polygons", classes="cell", tile="on")
    assert polygons.status_code == 200 and polygons.json()["features"][0]["geometry"]["coordinates"]

    overlay = ask(server, body, format="overlay", tile="on")
    assert overlay.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(overlay.content)).size == image.size

    probs = ask(server, body, format="probs", classes="cell,nucleus", tile="on")
    assert probs.headers["content-type"] == "application/x-npy"
    probs = np.load(io.BytesIO(probs.content), allow_pickle=False)
    assert probs.dtype == np.float16 and probs.shape == (2, image.height, image.width)
    assert ((probs.max(0) > 0.5) == (mask > 0)).mean() > 0.99


def test_tile_through_the_client_and_a_bad_value(server, reference):
    image = Image.fromarray(generate_scene(2025, (300, 500))[0])  # small: tiled only when asked
    client = SegservClient(server.inference_url, key_file=server.workdir / "key_file.json")
    tiled = client.predict(image, format="png", tile="on").mask()
    assert np.array_equal(tiled, reference.predict([image], tile="on")[0])
    assert np.array_equal(client.predict(image, format="png").mask(), reference.predict([image], tile="off")[0])
    response = ask(server, encode_image(image), tile="always")
    assert response.status_code == 400 and response.json()["type"] == "invalid_option"
    assert "auto, on, off" in response.json()["message"]


def test_over_the_pixel_limit_is_413_naming_the_limit(server):
    bomb = encode_image(Image.new("1", (10000, 10000)))  # 12 kB on the wire, 100 Mpx
    body = json.dumps({"image": base64.b64encode(bomb).decode(), "tile": "on"})
    response = requests.post(f"{server.inference_url}/predictions/{MODEL}", data=body, timeout=60,
                             headers={**server.headers(), "Content-Type": "application/json"})
    assert response.status_code == 413
    error = response.json()
    assert error["type"] == "image_too_large" and "max_pixels" in error["message"] and "40000000" in error["message"]
