"""Binary and multi-label archives built by build_mar.sh from 1- and 2-channel models, served by a real
TorchServe: the head is detected at build, the served masks equal the in-process ones."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from support import MODEL_CONFIG, encode_image, random_image, torchserve
from support.handlers import archive_doc, ask, unpacked_handler

from segserve.config import ServingConfig
from segserve.families import build_model
from segserve.tools.build import BuildError, build

UNET = {"base_channels": 4, "depth": 2}


def unet_weights(path, channels):
    torch.manual_seed(channels)
    torch.save(build_model("unet", channels, **UNET).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    store = root / "store"
    build("lesions", MODEL_CONFIG, unet_weights(root / "one.pt", 1), store, classes=["lesion"], input_size=[64, 64],
          arch_params=UNET)
    build("labels", MODEL_CONFIG, unet_weights(root / "two.pt", 2), store, classes=["background", "a", "b"],
          input_size=[64, 64], arch_params=UNET)
    return store


def archive_config(store, name):
    return archive_doc(store / f"{name}.mar")["handler"]


def test_the_build_detects_binary_and_multilabel_heads(archives):
    lesions = ServingConfig.from_dict(archive_config(archives, "lesions"))
    assert (lesions.head, lesions.class_names, lesions.out_channels) == ("binary", ["background", "lesion"], 1)
    labels = ServingConfig.from_dict(archive_config(archives, "labels"))
    assert (labels.head, labels.num_classes, labels.out_channels) == ("multilabel", 3, 2)


def test_a_head_that_does_not_fit_is_a_build_error_naming_the_flag(tmp_path):
    weights = unet_weights(tmp_path / "two.pt", 2)
    with pytest.raises(BuildError, match="pass --head softmax"):
        build("x", MODEL_CONFIG, weights, tmp_path, classes=["cat", "dog"], arch_params=UNET)
    build("x", MODEL_CONFIG, weights, tmp_path, classes=["cat", "dog"], arch_params=UNET, head="multilabel")
    assert archive_config(tmp_path, "x")["model"]["head"] == "multilabel"
    with pytest.raises(BuildError, match="--head softmax with 3 classes"):
        build("y", MODEL_CONFIG, weights, tmp_path, classes=["background", "a", "b"], arch_params=UNET,
              head="softmax")


@pytest.fixture(scope="module")
def served(tmp_path_factory, archives):
    root = tmp_path_factory.mktemp("heads-served")
    with torchserve(root, archives, ["lesions.mar", "labels.mar"], ["lesions", "labels"], timeout=300) as ts:
        yield ts


def in_process(store, name, tmp_path):
    return unpacked_handler(store / f"{name}.mar", tmp_path / name)


@pytest.mark.integration
def test_a_served_binary_mask_shrinks_as_the_threshold_rises_and_equals_in_process(served, archives, tmp_path):
    image = encode_image(random_image(90, 70, seed=5))
    local = in_process(archives, "lesions", tmp_path)
    areas = []
    for threshold in ("0.2", "0.4", "0.5", "0.6", "0.8"):
        response = requests.post(f"{served.inference_url}/predictions/lesions", headers=served.headers(),
                                 files={"data": ("x.png", image, "image/png")},
                                 data={"format": "png", "threshold": threshold}, timeout=60)
        assert response.status_code == 200, response.text
        mask = np.asarray(Image.open(io.BytesIO(response.content)))
        expected = np.asarray(Image.open(io.BytesIO(ask(local, {"body": image, "format": b"png",
                                                                "threshold": threshold.encode()}).body)))
        assert (mask == expected).all()
        areas.append(int((mask == 1).sum()))
    assert all(a >= b for a, b in zip(areas, areas[1:], strict=False)) and areas[0] > areas[-1], areas
    body = requests.post(f"{served.inference_url}/predictions/lesions", headers=served.headers(), data=image,
                         timeout=60).json()
    assert (body["family"], body["head"]) == ("unet", "binary")


@pytest.mark.integration
def test_served_multilabel_overlaps_survive_in_rle(served, archives, tmp_path):
    image = encode_image(random_image(80, 60, seed=7))
    fields = {"format": "rle", "threshold": "0.3"}
    response = requests.post(f"{served.inference_url}/predictions/labels", headers=served.headers(),
                             files={"data": ("x.png", image, "image/png")}, data=fields, timeout=60)
    assert response.status_code == 200, response.text
    classes = response.json()["classes"]
    layers = [coco_mask.decode({"size": c["rle"]["size"], "counts": c["rle"]["counts"].encode()}) for c in classes]
    assert (layers[1] & layers[2]).sum() > 0  # pixels that are both a and b
    local = json.loads(ask(in_process(archives, "labels", tmp_path),
                           {"body": image, **{k: v.encode() for k, v in fields.items()}}).body)
    assert local["classes"] == classes
