"""The request/response contract through a real TorchServe: input kinds, image formats, formats, errors."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import shapely.geometry
from PIL import Image
from pycocotools import mask as coco_mask
from support import MODEL, encode_image, jpeg

from segserve.tools.synthetic import generate_scene

pytestmark = pytest.mark.integration

SCENE = Image.fromarray(generate_scene(500, (240, 320))[0])


def post(server, path="", **kwargs) -> requests.Response:
    headers = {**server.headers(), **kwargs.pop("headers", {})}
    return requests.post(f"{server.inference_url}/predictions/{MODEL}{path}", headers=headers, timeout=120, **kwargs)


def as_mask(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


@pytest.fixture(scope="module")
def expected(reference):
    (mask,) = reference.predict([SCENE])
    return mask


def test_every_input_kind_gives_the_same_mask(server, expected):
    png = encode_image(SCENE)
    answers = [
        post(server, data=png, headers={"Accept": "image/png"}),
        post(server, data=png, headers={"Accept": "image/png", "Content-Type": "image/png"}),
        post(server, files={"data": ("a.png", png, "image/png")}, data={"format": "png"}),
        post(server, files={"file": ("a.png", png, "image/png")}, data={"format": "png"}),
        post(server, json={"image": base64.b64encode(png).decode(), "format": "png"}),
        post(server, "/1.0/png", data=png),  # format from the path after the version
    ]
    for response in answers:
        assert response.status_code == 200, response.text
        assert np.array_equal(as_mask(response.content), expected)




def exif_rotated(image):
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg(image, exif=exif.tobytes())


def png16(image):
    gray = np.asarray(image.convert("L"), dtype=np.uint16) * 257
    return encode_image(Image.fromarray(gray))


CASES = {
    "jpeg": (lambda im: jpeg(im), (320, 240)),
    "jpeg-progressive": (lambda im: jpeg(im, progressive=True), (320, 240)),
    "jpeg-cmyk": (lambda im: jpeg(im.convert("CMYK")), (320, 240)),
    "jpeg-exif-rotated": (exif_rotated, (240, 320)),
    "png-palette": (lambda im: encode_image(im.convert("P")), (320, 240)),
    "png-gray": (lambda im: encode_image(im.convert("L")), (320, 240)),
    "png-16bit": (png16, (320, 240)),
    "png-rgba": (lambda im: encode_image(im.convert("RGBA")), (320, 240)),
    "webp": (lambda im: encode_image(im, "WEBP", quality=90), (320, 240)),
    "tiff": (lambda im: encode_image(im, "TIFF"), (320, 240)),
    "bmp": (lambda im: encode_image(im, "BMP"), (320, 240)),
    "gif": (lambda im: encode_image(im.convert("P"), "GIF"), (320, 240)),
}


@pytest.mark.parametrize("name", CASES)
def test_image_formats(server, expected, name):
    encode, size = CASES[name]
    response = post(server, data=encode(SCENE), headers={"Accept": "image/png"})
    assert response.status_code == 200, response.text
    mask = as_mask(response.content)
    assert (mask.shape[1], mask.shape[0]) == size
    if name in ("jpeg", "webp", "tiff", "bmp", "png-rgba"):  # same colours: nearly the same mask
        assert (mask == expected).mean() > 0.97


def test_rle_round_trip_and_polygons_through_the_server(server, expected):
    png = encode_image(SCENE)
    rle = post(server, files={"data": ("a.png", png)}, data={"format": "rle"}).json()
    for entry in rle["classes"]:
        decoded = coco_mask.decode({"size": entry["rle"]["size"], "counts": entry["rle"]["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), expected == entry["id"])
    polys = post(server, files={"data": ("a.png", png)}, data={"format": "polygons", "classes": "nucleus"}).json()
    assert polys["type"] == "FeatureCollection"
    (nucleus,) = polys["features"]
    assert nucleus["properties"]["class"] == "nucleus" and nucleus["geometry"]["type"] == "MultiPolygon"
    geometry = shapely.geometry.shape(nucleus["geometry"])
    assert geometry.is_valid and geometry.area == nucleus["properties"]["area"] == (expected == 2).sum()


def test_overlay_and_probs_through_the_server(server, expected):
    png = encode_image(SCENE)
    overlay = post(server, data=png, headers={"Accept": "image/jpeg"})
    assert overlay.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(overlay.content)).size == SCENE.size
    probs = post(server, files={"data": ("a.png", png)}, data={"format": "probs"})
    assert probs.headers["content-type"] == "application/x-npy"
    array = np.load(io.BytesIO(probs.content), allow_pickle=False)
    assert array.shape == (3, 240, 320) and (array.argmax(0) == expected).mean() > 0.995


def error_of(response, status, kind=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "type", "message"} and body["code"] == status
    assert "Traceback" not in body["message"] and "/tmp" not in body["message"] and "/work" not in body["message"]
    if kind:
        assert body["type"] == kind
    return body


def test_error_statuses(server):
    png = encode_image(SCENE)
    octet = {"Content-Type": "application/octet-stream"}
    error_of(post(server, data=b"", headers=octet), 400, "empty_body")
    error_of(post(server, data=b"GIF89a garbage", headers=octet), 400, "invalid_image")
    error_of(post(server, json={"image": "%%% not base64"}), 400, "invalid_image")
    error_of(post(server, data=b'{"image": "abc"', headers={"Content-Type": "application/json"}), 400,
             "bad_request")
    error_of(post(server, json={"format": "png"}), 400, "empty_body")
    error_of(post(server, files={"data": ("a.png", png)}, data={"format": "bmp"}), 400, "invalid_option")
    error_of(post(server, files={"data": ("a.png", png)}, data={"colour": "red"}), 400, "invalid_option")
    error_of(post(server, files={"data": ("a.png", png)}, data={"classes": "dog"}), 400, "invalid_option")
    error_of(post(server, "/1.0/gif", data=png), 400, "invalid_option")
    two = {"data": ("a.png", png, "image/png"), "file": ("b.png", png, "image/png")}
    assert "one image per request" in error_of(post(server, files=two), 400, "bad_request")["message"]
    error_of(post(server, data=png, headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type")
    error_of(post(server, data=png, headers={"Content-Type": "application/xml"}), 415, "unsupported_media_type")
    bomb = encode_image(Image.new("1", (9000, 9000)))  # 81 Mpx, a few kB on the wire
    assert error_of(post(server, data=bomb, headers=octet), 413, "image_too_large")["message"].count("max_pixels")
    big = png + b"\0" * 20_000_001  # over max_bytes, under TorchServe's max_request_size
    assert "max_bytes" in error_of(post(server, data=big, headers=octet), 413, "payload_too_large")["message"]


def test_mixed_good_and_bad_requests_in_one_batch(server, expected, reference):
    png = encode_image(SCENE)
    bad = [b"", b"not an image", png[:300]]
    bodies = [png, *bad, png, png[:50], png]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: post(server, data=b, headers={
            "Accept": "image/png", "Content-Type": "application/octet-stream"}), bodies))
    for body, response in zip(bodies, responses, strict=True):
        if body == png:
            assert response.status_code == 200 and np.array_equal(as_mask(response.content), expected)
        else:
            assert response.status_code == 400 and json.loads(response.content)["code"] == 400
