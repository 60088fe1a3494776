"""Polygons along pixel edges are valid geometry (shapely) and fill back to exactly the mask's pixels;
format=coco's file loads in pycocotools' COCO and gives back each class's mask."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from pycocotools.coco import COCO
from shapely.geometry import MultiPolygon

from segserve.coco import coco_response
from segserve.geometry import multipolygon_coordinates, polygons
from segserve.masks import MaskSet
from segserve.tools.synthetic import generate_scene


def filled(shapes, height, width) -> np.ndarray:
    """The pixels whose centres the polygons contain."""
    ys, xs = np.mgrid[0:height, 0:width]
    return shapely.contains_xy(MultiPolygon(shapes), xs + 0.5, ys + 0.5)


def adversarial(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    checker = np.indices((24, 30)).sum(0) % 2 == 0
    single = np.zeros((9, 9), bool)
    single[4, 4] = True
    border_hole = np.ones((12, 12), bool)
    border_hole[0:4, 3:6] = False  # a notch open to the border
    border_hole[5:7, 5:7] = False  # a hole
    border_hole[9:12, 0:2] = False
    diagonal = np.eye(10, dtype=bool) | np.eye(10, k=2, dtype=bool)
    ring_touching = np.zeros((10, 10), bool)
    ring_touching[2:8, 2:8] = True
    ring_touching[3:5, 3:5] = False
    ring_touching[5:7, 5:7] = False  # two holes meeting at a corner
    return {"checker": checker, "single": single, "border_hole": border_hole, "diagonal": diagonal,
            "ring_touching": ring_touching, "noise": rng.random((40, 50)) < 0.5, "line": np.eye(1, 30, dtype=bool)}


@pytest.mark.parametrize("name", list(adversarial(0)))
def test_adversarial_masks_give_valid_polygons_that_fill_back_exactly(name):
    binary = adversarial(0)[name]
    shapes = polygons(binary)
    geometry = MultiPolygon(shapes)
    assert geometry.is_valid, shapely.is_valid_reason(geometry)
    assert (filled(shapes, *binary.shape) == binary).all()
    assert geometry.area == binary.sum()


def test_generated_scenes_give_valid_polygons_for_every_class():
    for seed in range(20):
        _, truth = generate_scene(seed, (96, 128))
        for class_id in (1, 2):
            binary = truth == class_id
            shapes = polygons(binary)
            assert MultiPolygon(shapes).is_valid and (filled(shapes, *binary.shape) == binary).all(), (seed, class_id)


def test_coordinates_are_closed_rings_of_whole_numbers():
    binary = adversarial(0)["border_hole"]
    (shape,) = multipolygon_coordinates(polygons(binary))
    assert len(shape) == 2  # the exterior and the one enclosed hole
    for ring in shape:
        assert ring[0] == ring[-1] and all(isinstance(v, int) for point in ring for v in point)


def test_a_vertex_budget_is_refused_before_any_polygon_is_built():
    with pytest.raises(ValueError, match="vertices"):
        polygons(adversarial(0)["checker"], max_vertices=100)


def test_the_coco_file_loads_in_pycocotools_and_gives_the_class_masks(tmp_path, config):
    _, truth = generate_scene(3, (80, 100))
    path = tmp_path / "coco.json"
    path.write_bytes(coco_response(MaskSet(truth), config, file_name="scene.png"))
    coco = COCO(str(path))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cell", "nucleus"]
    (image,) = coco.loadImgs(coco.getImgIds())
    assert (image["width"], image["height"], image["file_name"]) == (100, 80, "scene.png")
    for annotation in coco.loadAnns(coco.getAnnIds()):
        binary = truth == annotation["category_id"]
        assert (coco.annToMask(annotation) == binary).all()
        assert annotation["area"] == binary.sum() and annotation["iscrowd"] == 1
    only = json.loads(coco_response(MaskSet(truth), config, classes=(2,)))
    assert [c["id"] for c in only["categories"]] == [2] and len(only["annotations"]) == 1
