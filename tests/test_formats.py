"""Every response format, through the handler as TorchServe calls it, checked against the mask it encodes;
and the format registry itself."""

import io
import json
import sys

import numpy as np
import pytest
import shapely
import shapely.geometry
from PIL import Image
from pycocotools import mask as coco_mask
from support import REPO, encode_image, random_image
from support.handlers import ask as ask_handler
from support.handlers import model_yaml

from segserve import encoders, formats
from segserve.encoders import polygons
from segserve.masks import remove_small_regions
from segserve.options import Options
from segserve.tools.inprocess import load_handler
from segserve.tools.scoring import binary_iou
from segserve.tools.synthetic import generate_scene


def ask(handler, image, **fields):
    data = {"data": encode_image(Image.fromarray(image))}
    data.update({k: str(v).encode() for k, v in fields.items()})
    return ask_handler(handler, data)


def served_mask(handler, image):
    return np.asarray(Image.open(io.BytesIO(ask(handler, image, format="png").body)))


def rasterize(geometry, size) -> np.ndarray:
    """A MultiPolygon back to pixels: a pixel is in when its centre is (vertices are pixel edges)."""
    ys, xs = np.indices(size)
    return shapely.contains_xy(geometry, xs + 0.5, ys + 0.5)


def check_geometry(coordinates, binary: np.ndarray) -> None:
    """Valid by shapely, closed rings, area = the pixels, and rasterizing back gives exactly the mask."""
    geometry = shapely.geometry.shape({"type": "MultiPolygon", "coordinates": coordinates})
    assert geometry.is_valid, shapely.is_valid_reason(geometry)
    for shape in coordinates:
        assert all(ring[0] == ring[-1] and len(ring) >= 4 for ring in shape)
    assert geometry.area == binary.sum()
    pixels = rasterize(geometry, binary.shape)
    assert binary_iou(pixels, binary) >= 0.98
    assert np.array_equal(pixels, binary)


def adversarial_masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    masks = {"checkerboard": np.indices((40, 40)).sum(0) % 2 == 1,
             "checkerboard, other phase": np.indices((41, 37)).sum(0) % 2 == 0,
             "noise": rng.random((80, 80)) > 0.5, "sparse noise": rng.random((80, 80)) > 0.8,
             "dense noise": rng.random((80, 80)) > 0.2,
             "full image": np.ones((12, 9), bool), "one pixel image": np.ones((1, 1), bool),
             "empty": np.zeros((10, 10), bool)}
    dots = np.zeros((20, 20), bool)
    dots[0, 0] = dots[5, 5] = dots[19, 19] = dots[0, 19] = dots[10, 3] = True
    masks["1-pixel regions, corners of the image"] = dots
    diagonal = np.zeros((10, 10), bool)
    diagonal[2, 2] = diagonal[3, 3] = diagonal[4, 4] = diagonal[4, 6] = diagonal[5, 5] = True
    masks["diagonal-touching pixels"] = diagonal
    border = np.ones((20, 20), bool)
    border[0:3, 5:8] = border[10, 0] = border[19, 19] = border[7:12, 15:20] = False
    masks["holes touching the border"] = border
    holes = np.ones((11, 11), bool)
    holes[3, 3] = holes[4, 4] = holes[5, 5] = holes[4, 6] = holes[6, 4] = False
    masks["holes touching at corners"] = holes
    island = np.zeros((9, 9), bool)
    island[1:8, 1:8] = True
    island[2:7, 2:7] = False
    island[3, 3] = island[4, 4] = island[5, 5] = True  # a diagonal of islands, the first touching the ring
    masks["islands in a hole, touching it at a corner"] = island
    lines = np.zeros((15, 15), bool)
    lines[::2] = True
    lines[:, 7] = True
    masks["1-pixel lines"] = lines
    return masks


def test_json_has_bbox_per_class(handler):
    image, _ = generate_scene(40, (200, 300))
    body = json.loads(ask(handler, image).body)
    mask = served_mask(handler, image)
    for entry in body["classes"]:
        rows, cols = np.nonzero(mask == entry["id"])
        if rows.size:
            assert entry["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]


def test_rle_decodes_to_exactly_the_served_mask(handler):
    for seed in range(5):
        image, _ = generate_scene(50 + seed, (231, 317))
        mask = served_mask(handler, image)
        body = json.loads(ask(handler, image, format="rle").body)
        assert (body["width"], body["height"]) == (317, 231)
        for entry in body["classes"]:
            rle = {"size": entry["rle"]["size"], "counts": entry["rle"]["counts"].encode()}
            assert np.array_equal(coco_mask.decode(rle).astype(bool), mask == entry["id"])


def test_polygons_are_a_geojson_feature_collection_that_rasterizes_back(handler):
    scores = 0
    for seed in range(8):
        image, _ = generate_scene(60 + seed, (256, 256))
        mask = served_mask(handler, image)
        body = json.loads(ask(handler, image, format="polygons").body)
        assert body["type"] == "FeatureCollection" and (body["width"], body["height"]) == (256, 256)
        assert [f["properties"]["class"] for f in body["features"]] == ["background", "cell", "nucleus"]
        for feature in body["features"]:
            properties = feature["properties"]
            assert feature["type"] == "Feature" and feature["geometry"]["type"] == "MultiPolygon"
            binary = mask == properties["class_id"]
            assert properties["area"] == binary.sum()
            check_geometry(feature["geometry"]["coordinates"], binary)
            if binary.any():
                x, y, w, h = encoders.bbox(binary)
                assert feature["bbox"] == [x, y, x + w, y + h]
                scores += 1
    assert scores >= 16


def test_the_client_reads_the_areas_of_a_polygons_answer(handler):
    from segserve.client import Prediction

    image, _ = generate_scene(69, (128, 160))
    mask = served_mask(handler, image)
    answer = Prediction(200, "application/json", ask(handler, image, format="polygons").body)
    assert answer.format == "polygons"
    assert answer.areas() == {c: (name, int((mask == c).sum())) for c, name in enumerate(("background", "cell",
                                                                                        "nucleus"))}


@pytest.mark.parametrize("name", list(adversarial_masks()))
def test_polygons_of_adversarial_masks_are_valid_and_exact(name):
    binary = adversarial_masks()[name]
    coordinates = polygons(binary)
    assert (coordinates == []) == (not binary.any())
    check_geometry(coordinates, binary)


def test_polygons_split_pixels_that_meet_only_at_a_corner():
    binary = np.zeros((4, 4), bool)
    binary[1, 1] = binary[2, 2] = True
    assert sorted(polygons(binary)) == [[[[1, 1], [2, 1], [2, 2], [1, 2], [1, 1]]],
                                        [[[2, 2], [3, 2], [3, 3], [2, 3], [2, 2]]]]


def test_polygons_of_the_served_mask_of_bench_photos_are_valid(handler):
    sys.path.insert(0, str(REPO))
    from bench.photos import photo

    for seed in range(2):
        image = np.asarray(photo(seed, (320, 240)))
        mask = served_mask(handler, image)
        body = json.loads(ask(handler, image, format="polygons").body)
        for feature in body["features"]:
            check_geometry(feature["geometry"]["coordinates"], mask == feature["properties"]["class_id"])


def test_polygon_holes():
    ring = np.zeros((20, 20), bool)
    ring[2:18, 2:18] = True
    ring[7:13, 7:13] = False
    (shape,) = polygons(ring)
    assert len(shape) == 2  # exterior + one hole
    check_geometry([shape], ring)


def test_min_area_drops_small_regions_only():
    binary = np.zeros((30, 30), bool)
    binary[1:3, 1:3] = True  # 4 px
    binary[10:20, 10:20] = True  # 100 px
    kept = remove_small_regions(binary, 5)
    assert kept[15, 15] and not kept[1, 1] and kept.sum() == 100


def test_rle_and_polygons_honour_classes_and_min_area(handler):
    image, _ = generate_scene(70, (256, 256))
    body = json.loads(ask(handler, image, format="rle", classes="nucleus", min_area=10_000_000).body)
    assert [e["name"] for e in body["classes"]] == ["nucleus"]
    assert body["classes"][0]["pixels"] == 0
    body = json.loads(ask(handler, image, format="polygons", classes="cell").body)
    assert [f["properties"]["class"] for f in body["features"]] == ["cell"]


def test_png_with_class_subset_zeroes_the_others(handler):
    image, _ = generate_scene(71, (256, 256))
    full = served_mask(handler, image)
    only = np.asarray(Image.open(io.BytesIO(ask(handler, image, format="png", classes="nucleus").body)))
    assert np.array_equal(only, np.where(full == 2, 2, 0))


def test_probs_are_float16_per_class_and_agree_with_mask(handler):
    image, _ = generate_scene(72, (123, 157))
    response = ask(handler, image, format="probs")
    assert response.content_type == "application/x-npy"
    probs = np.load(io.BytesIO(response.body), allow_pickle=False)
    assert probs.dtype == np.float16 and probs.shape == (3, 123, 157)
    assert np.allclose(probs.astype(np.float32).sum(0), 1, atol=1e-2)
    assert (probs.argmax(0) == served_mask(handler, image)).mean() >= 0.995
    subset = np.load(io.BytesIO(ask(handler, image, format="probs", classes="cell").body))
    assert subset.shape == (1, 123, 157)


def test_probs_over_the_response_limit_is_413_with_a_hint():
    limited = load_handler(REPO / "model", model_yaml_config=model_yaml(limits={"max_response_bytes": 1000}))
    response = ask(limited, generate_scene(73, (64, 64))[0], format="probs")
    assert response.status == 413 and response.phrase == "Request Entity Too Large"
    error = json.loads(response.body)
    assert "max_response_bytes" in error["message"] and "format=png" in error["message"]


@pytest.mark.parametrize("fmt, content_type", [("overlay", "image/jpeg"), ("png", "image/png")])
def test_image_formats_at_input_size(handler, fmt, content_type):
    image, _ = generate_scene(74, (99, 141))
    response = ask(handler, image, format=fmt)
    assert response.content_type == content_type
    assert Image.open(io.BytesIO(response.body)).size == (141, 99)


# -- the registry ----------------------------------------------------------------------------------
def test_each_accept_media_type_selects_one_format():
    claimed = [media for entry in formats.REGISTRY.values() for media in entry.accept]
    assert len(claimed) == len(set(claimed))
    assert {media: formats.for_accept(media).name for media in claimed} == {
        "application/json": "json", "image/png": "png", "image/jpeg": "overlay", "application/x-npy": "probs",
        # segserve.medical's (tests/test_medical.py)
        "application/dicom": "dicom-seg", "application/gzip": "nifti", "application/x-nifti": "nifti",
        "application/zip": "slices"}
    # By quality (application/json's 1 over image/png's 0.9), case-insensitive, unknown types passed over.
    assert formats.for_accept("text/html, IMAGE/PNG;q=0.9, application/json") is formats.REGISTRY["json"]
    assert formats.for_accept("text/html, IMAGE/PNG, application/json;q=0.5") is formats.REGISTRY["png"]
    assert formats.for_accept("*/*") is formats.REGISTRY[formats.DEFAULT] and formats.for_accept("") is None


# Not probs (the next test), nor the medical answers that need their DICOM or NIfTI source (tests/test_medical.py).
@pytest.mark.parametrize("name", [name for name, entry in formats.REGISTRY.items()
                                  if not entry.needs_probs and entry.needs_source is None])
@pytest.mark.parametrize("kind", ["noise", "checker"])
@pytest.mark.parametrize("size", [(1, 1), (7, 5), (64, 48), (257, 131)])
def test_size_estimates_bound_the_answers_of_hard_masks(config, name, kind, size):
    width, height = size
    rng = np.random.default_rng(width)
    mask = rng.integers(0, 3, (height, width)) if kind == "noise" else np.indices((height, width)).sum(0) % 3
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    entry = formats.REGISTRY[name]
    body = entry.encode(formats.EncoderInput(mask.astype(np.uint8), Options(format=name), config,
                                             image if entry.needs_image else None))
    assert len(body) <= entry.estimate(width, height, config.num_classes)


def test_the_probs_estimate_is_its_data_and_only_probs_is_capped(config):
    probs = np.random.default_rng(0).random((2, 31, 17)).astype(np.float16)
    body = formats.REGISTRY["probs"].encode(formats.EncoderInput(probs, Options(format="probs"), config))
    assert formats.REGISTRY["probs"].estimate(17, 31, 2) == probs.nbytes == len(body) - 128  # .npy header
    assert [name for name, entry in formats.REGISTRY.items() if entry.capped] == ["probs"]
    assert [name for name, entry in formats.REGISTRY.items() if entry.needs_probs] == ["probs", "dicom-seg-fractional"]
    assert [name for name, entry in formats.REGISTRY.items() if entry.needs_image] == ["overlay"]


def test_a_new_format_is_one_registry_entry(handler, monkeypatch):
    def counts(job):
        return ",".join(str(int(job.output.binary(c.id).sum())) for c in job.config.classes).encode()

    entry = formats.Format("counts", "text/csv", ("text/csv",), counts, lambda w, h, k: 4 * k * len(str(w * h)))
    monkeypatch.setitem(formats.REGISTRY, "counts", entry)
    image = random_image(40, 30)
    mask = np.asarray(Image.open(io.BytesIO(ask_handler(handler, {"body": encode_image(image),
                                                                  "format": b"png"}).body)))
    for inputs, headers in (({"body": encode_image(image), "format": b"counts"}, {}),
                            ({"body": encode_image(image)}, {"Accept": "text/csv"})):
        reply = ask_handler(handler, inputs, headers)
        assert (reply.status, reply.content_type) == (200, "text/csv")
        assert reply.body.decode() == ",".join(str(int((mask == c).sum())) for c in range(3))


def test_the_safety_net_makes_a_valid_multipolygon_of_the_union():
    # Two squares sharing an edge and one overlapping them: make_valid may answer a Polygon or a collection.
    touching = shapely.MultiPolygon([shapely.box(0, 0, 2, 2), shapely.box(2, 0, 4, 2), shapely.box(1, 1, 3, 3)])
    assert not touching.is_valid
    fixed = encoders.made_valid(touching)
    assert fixed.geom_type == "MultiPolygon" and fixed.is_valid and fixed.area == shapely.union_all(touching.geoms).area


@pytest.mark.parametrize("seed", range(40))
def test_polygons_of_small_random_masks_are_valid_and_exact(seed):
    rng = np.random.default_rng(seed)
    binary = rng.random((int(rng.integers(1, 14)), int(rng.integers(1, 14)))) < rng.uniform(0.2, 0.8)
    check_geometry(polygons(binary), binary)
