"""Every response format from the in-process pipeline, checked against the mask it encodes."""

import io
import json

import numpy as np
import pytest
from conftest import encode_image
from PIL import Image, ImageDraw
from pycocotools import mask as coco_mask

from segserve.encoders import polygons, remove_small_regions
from segserve.pipeline import Request
from segserve.tools.synthetic import generate_scene


def ask(reference, image, **fields):
    data = {"data": encode_image(Image.fromarray(image))}
    data.update({k: str(v).encode() for k, v in fields.items()})
    (response,) = reference.handle_batch([Request(inputs=data)])
    return response


def served_mask(reference, image):
    return np.asarray(Image.open(io.BytesIO(ask(reference, image, format="png").body)))


def rasterize(shapes, size):
    canvas = Image.new("L", (size[1], size[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for exterior, *holes in shapes:
        draw.polygon([tuple(p) for p in exterior], fill=1, outline=1)
        for hole in holes:
            draw.polygon([tuple(p) for p in hole], fill=0, outline=1)
    return np.asarray(canvas, dtype=bool)


def iou(a, b):
    union = (a | b).sum()
    return 1.0 if union == 0 else (a & b).sum() / union


def test_json_has_bbox_per_class(reference):
    image, _ = generate_scene(40, (200, 300))
    body = json.loads(ask(reference, image).body)
    mask = served_mask(reference, image)
    for entry in body["classes"]:
        rows, cols = np.nonzero(mask == entry["id"])
        if rows.size:
            assert entry["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]


def test_rle_decodes_to_exactly_the_served_mask(reference):
    for seed in range(5):
        image, _ = generate_scene(50 + seed, (231, 317))
        mask = served_mask(reference, image)
        body = json.loads(ask(reference, image, format="rle").body)
        assert (body["width"], body["height"]) == (317, 231)
        for entry in body["classes"]:
            rle = {"size": entry["rle"]["size"], "counts": entry["rle"]["counts"].encode()}
            assert np.array_equal(coco_mask.decode(rle).astype(bool), mask == entry["id"])


def test_polygons_rasterize_back_to_the_mask(reference):
    scores = []
    for seed in range(8):
        image, _ = generate_scene(60 + seed, (256, 256))
        mask = served_mask(reference, image)
        body = json.loads(ask(reference, image, format="polygons").body)
        for entry in body["classes"]:
            if entry["pixels"] == 0:
                continue
            assert entry["geometry"]["type"] == "MultiPolygon"
            for shape in entry["geometry"]["coordinates"]:
                assert all(ring[0] == ring[-1] for ring in shape)
            score = iou(rasterize(entry["geometry"]["coordinates"], mask.shape), mask == entry["id"])
            assert score >= 0.98, (seed, entry["name"], score)
            scores.append(score)
    assert len(scores) >= 16


def test_polygon_holes():
    ring = np.zeros((20, 20), bool)
    ring[2:18, 2:18] = True
    ring[7:13, 7:13] = False
    (shape,) = polygons(ring)
    assert len(shape) == 2  # exterior + one hole
    assert iou(rasterize([shape], ring.shape), ring) >= 0.98


def test_min_area_drops_small_regions_only():
    binary = np.zeros((30, 30), bool)
    binary[1:3, 1:3] = True  # 4 px
    binary[10:20, 10:20] = True  # 100 px
    kept = remove_small_regions(binary, 5)
    assert kept[15, 15] and not kept[1, 1] and kept.sum() == 100


def test_rle_and_polygons_honour_classes_and_min_area(reference):
    image, _ = generate_scene(70, (256, 256))
    body = json.loads(ask(reference, image, format="rle", classes="nucleus", min_area=10_000_000).body)
    assert [e["name"] for e in body["classes"]] == ["nucleus"]
    assert body["classes"][0]["pixels"] == 0
    body = json.loads(ask(reference, image, format="polygons", classes="cell").body)
    assert [e["name"] for e in body["classes"]] == ["cell"]


def test_png_with_class_subset_zeroes_the_others(reference):
    image, _ = generate_scene(71, (256, 256))
    full = served_mask(reference, image)
    only = np.asarray(Image.open(io.BytesIO(ask(reference, image, format="png", classes="nucleus").body)))
    assert np.array_equal(only, np.where(full == 2, 2, 0))


def test_probs_are_float16_per_class_and_agree_with_mask(reference):
    image, _ = generate_scene(72, (123, 157))
    response = ask(reference, image, format="probs")
    assert response.content_type == "application/x-npy"
    probs = np.load(io.BytesIO(response.body), allow_pickle=False)
    assert probs.dtype == np.float16 and probs.shape == (3, 123, 157)
    assert np.allclose(probs.astype(np.float32).sum(0), 1, atol=1e-2)
    assert (probs.argmax(0) == served_mask(reference, image)).mean() >= 0.995
    subset = np.load(io.BytesIO(ask(reference, image, format="probs", classes="cell").body))
    assert subset.shape == (1, 123, 157)


def test_probs_over_the_response_limit_is_413_with_a_hint(reference, monkeypatch):
    from dataclasses import replace

    monkeypatch.setattr(reference, "config", replace(reference.config, limits=replace(
        reference.config.limits, max_response_bytes=1000)))
    response = ask(reference, generate_scene(73, (64, 64))[0], format="probs")
    assert response.status == 413
    error = json.loads(response.body)
    assert "max_response_bytes" in error["message"] and "format=png" in error["message"]


@pytest.mark.parametrize("fmt, content_type", [("overlay", "image/jpeg"), ("png", "image/png")])
def test_image_formats_at_input_size(reference, fmt, content_type):
    image, _ = generate_scene(74, (99, 141))
    response = ask(reference, image, format=fmt)
    assert response.content_type == content_type
    assert Image.open(io.BytesIO(response.body)).size == (141, 99)
