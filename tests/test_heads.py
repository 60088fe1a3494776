"""Heads (softmax, binary sigmoid, multi-label sigmoid) and the masks' post-processing, through the real
handler in-process on stand-in models whose answers are known."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import shapely.geometry
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from support import REPO, encode_image
from support.handlers import ask, stand_in_handler
from torch import nn

from segserve import heads, tiling
from segserve.config import ServingConfig
from segserve.masks import MaskSet, PostProcess, fill_holes, postprocess
from segserve.tools.synthetic import generate_scene


class GreenLogit(nn.Module):
    """One sigmoid channel: the green value (normalized to about -2..2) times 4."""

    def forward(self, x):
        return x[:, 1:2] * 4


class RedBlueLogits(nn.Module):
    """Two independent sigmoid channels: red and blue, so a purple pixel is both classes."""

    def forward(self, x):
        return torch.cat([x[:, 0:1], x[:, 2:3]], 1) * 4


def green_ramp(width: int = 64, height: int = 32) -> Image.Image:
    """Green rising from 0 at the left to 255 at the right."""
    ramp = np.linspace(0, 255, width).round().astype(np.uint8)
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 1] = ramp[None, :]
    return Image.fromarray(pixels)


def red_blue(width: int = 60, height: int = 20) -> Image.Image:
    """Red over the left two thirds, blue over the right two thirds: the middle third is both."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : 2 * width // 3, 0] = 255
    pixels[:, width // 3:, 2] = 255
    return Image.fromarray(pixels)


BINARY = {"head": "binary", "classes": [{"name": "background"}, {"name": "lesion"}]}
MULTILABEL = {"head": "multilabel", "classes": [{"name": "background"}, {"name": "red"}, {"name": "blue"}]}


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    return stand_in_handler(tmp_path_factory.mktemp("binary"), GreenLogit(), **BINARY)


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory):
    return stand_in_handler(tmp_path_factory.mktemp("multilabel"), RedBlueLogits(), **MULTILABEL)


def png_mask(reply) -> np.ndarray:
    assert reply.status == 200, reply.body[:300]
    return np.asarray(Image.open(io.BytesIO(reply.body)))


# -- detection at build ---------------------------------------------------------------------------------
@pytest.mark.parametrize("names, channels, requested, expected", [
    (["background", "cell", "nucleus"], 3, None, ("softmax", 3)),
    (["lesion"], 1, None, ("binary", 2)),
    (["background", "lesion"], 1, None, ("binary", 2)),
    (["background", "cat", "dog"], 2, None, ("multilabel", 3)),
    (["cat", "dog"], 2, "multilabel", ("multilabel", 3)),
    (["cat", "dog"], 2, "softmax", ("softmax", 2)),
    (["road", "car"], 1, "binary", None),  # binary with two named classes + background would need 2 channels
])
def test_the_head_follows_from_channels_and_classes(names, channels, requested, expected):
    if expected is None:
        with pytest.raises(heads.HeadError, match="expects 2 output channel"):
            heads.detect(["road", "car", "bus"], channels, requested)
        return
    head, classes = heads.detect(names, channels, requested)
    assert (head, len(classes)) == expected
    assert heads.get(head).channels(len(classes)) == channels


def test_an_ambiguous_head_is_refused_naming_the_flags():
    with pytest.raises(heads.HeadError) as info:
        heads.detect(["cat", "dog"], 2)
    assert "--head softmax" in str(info.value) and "--head multilabel" in str(info.value)
    with pytest.raises(heads.HeadError, match="3 classes are configured"):
        heads.detect(["a", "b", "c"], 5)


def test_a_family_with_a_known_head_is_not_ambiguous():
    assert heads.detect(["road", "car"], 2, default="softmax") == ("softmax", ["road", "car"])


# -- binary -----------------------------------------------------------------------------------------------
def test_a_binary_mask_shrinks_as_the_threshold_rises(binary):
    image = encode_image(green_ramp())
    areas = [int((png_mask(ask(binary, {"body": image, "format": b"png", "threshold": str(t).encode()})) == 1).sum())
             for t in (0.05, 0.3, 0.5, 0.7, 0.95)]
    assert all(a >= b for a, b in zip(areas, areas[1:], strict=False)) and areas[0] > areas[-1] > 0, areas
    # The default threshold is 0.5: the same mask as asking for it.
    default = png_mask(ask(binary, {"body": image, "format": b"png"}))
    assert (default == png_mask(ask(binary, {"body": image, "format": b"png", "threshold": b"0.5"}))).all()
    # sigmoid(4 * (g - 0.5) / 0.25) > 0.5 <=> green above half: the right half of the ramp.
    assert 0.45 < (default == 1).mean() < 0.55


def test_binary_json_names_the_head_and_probs_are_background_and_class(binary):
    body = json.loads(ask(binary, {"body": encode_image(green_ramp())}).body)
    assert body["head"] == "binary" and [c["name"] for c in body["classes"]] == ["background", "lesion"]
    reply = ask(binary, {"body": encode_image(green_ramp()), "format": b"probs"})
    probs = np.load(io.BytesIO(reply.body))
    assert probs.shape == (2, 32, 64)
    np.testing.assert_allclose(probs.sum(0), 1, atol=2e-3)
    assert probs[1, :, -1].min() > 0.99 and probs[1, :, 0].max() < 0.01


# -- multi-label --------------------------------------------------------------------------------------------
def test_multilabel_overlaps_survive_in_rle_and_png_takes_the_top_class(multilabel):
    image = red_blue()
    body = json.loads(ask(multilabel, {"body": encode_image(image), "format": b"rle"}).body)
    assert body["head"] == "multilabel"
    layers = {c["name"]: coco_mask.decode({"size": c["rle"]["size"], "counts": c["rle"]["counts"].encode()})
              for c in body["classes"]}
    width = image.width
    red, blue = layers["red"].astype(bool), layers["blue"].astype(bool)
    assert red[:, : 2 * width // 3].all() and not red[:, 2 * width // 3:].any()
    assert blue[:, width // 3:].all() and not blue[:, : width // 3].any()
    assert (red & blue).sum() == image.height * (2 * width // 3 - width // 3)  # the purple third is both
    assert not layers["background"].any()
    labels = png_mask(ask(multilabel, {"body": encode_image(image), "format": b"png"}))
    assert (labels[:, : width // 3] == 1).all() and (labels[:, 2 * width // 3:] == 2).all()
    assert set(np.unique(labels[:, width // 3: 2 * width // 3])) <= {1, 2}  # the higher score; equal here


def test_multilabel_instances_and_polygons_keep_each_class(multilabel):
    body = json.loads(ask(multilabel, {"body": encode_image(red_blue()), "format": b"instances"}).body)
    assert [(i["class"], i["area"]) for i in body["instances"]] == [("red", 20 * 40), ("blue", 20 * 40)]
    polygons = json.loads(ask(multilabel, {"body": encode_image(red_blue()), "format": b"polygons"}).body)
    assert [len(f["geometry"]["coordinates"]) for f in polygons["features"]] == [0, 1, 1]
    red, blue = (shapely.geometry.shape(f["geometry"]) for f in polygons["features"][1:])
    assert red.is_valid and blue.is_valid and red.area == blue.area == 20 * 40
    assert red.intersection(blue).area == 20 * 20  # the purple third is in both


# -- softmax threshold ------------------------------------------------------------------------------------
def test_a_softmax_threshold_sends_unsure_pixels_to_background_or_the_ignore_label(tmp_path):
    from support.handlers import ChannelArgmax

    # Red a bit over green: softmax top probability ~0.6 there; pure red: ~0.99.
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :16] = (255, 0, 0)
    pixels[:, 16:] = (140, 120, 0)
    image = encode_image(Image.fromarray(pixels))
    plain = stand_in_handler(tmp_path / "plain", ChannelArgmax())
    assert (png_mask(ask(plain, {"body": image, "format": b"png"})) == 0).all()  # red = class 0 everywhere
    ignoring = stand_in_handler(tmp_path / "ignoring", ChannelArgmax(), postprocess={"ignore_label": 255})
    cut = png_mask(ask(ignoring, {"body": image, "format": b"png", "threshold": b"0.9"}))
    assert (cut[:, :16] == 0).all() and (cut[:, 16:] == 255).all()


# -- options ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, words", [
    ({"threshold": b"1.5"}, ["threshold", "[0, 1]"]),
    ({"threshold": b"nan"}, ["threshold", "[0, 1]"]),
    ({"smooth": b"99"}, ["smooth", "0..50"]),
    ({"smooth": b"-1"}, ["smooth", "0..50"]),
    ({"smooth_method": b"gaussian"}, ["median, open, close"]),
    ({"fill_holes": b"maybe"}, ["fill_holes", "true or false"]),
    ({"min_area": "\u00b2".encode()}, ["min_area"]),
    ({"format": b"probs", "threshold": b"0.5"}, ["threshold", "format=probs"]),
])
def test_post_processing_options_out_of_range_are_400_naming_the_range(binary, fields, words):
    reply = ask(binary, {"body": encode_image(green_ramp()), **fields})
    assert reply.status == 400, reply.body
    message = json.loads(reply.body)["message"]
    for word in words:
        assert word in message


# -- post-processing ----------------------------------------------------------------------------------------
def blob_with_hole_and_speck(size: int = 40) -> np.ndarray:
    labels = np.zeros((size, size), np.uint8)
    labels[5:25, 5:25] = 1
    labels[12:16, 12:16] = 0  # a hole
    labels[32, 32] = 1  # a speck
    labels[30:36, 2:8] = 2  # another class, 36 px
    return labels


def test_fill_holes_fills_only_what_one_class_encloses():
    labels = blob_with_hole_and_speck()
    filled = postprocess(MaskSet(labels), PostProcess(fill_holes=True)).labels
    assert (filled[12:16, 12:16] == 1).all()
    assert (filled[labels != 0] == labels[labels != 0]).all() and (filled[0] == 0).all()
    binary = labels == 1
    assert fill_holes(binary)[12:16, 12:16].all() and fill_holes(binary).sum() == binary.sum() + 16


def test_min_area_and_smoothing_remove_specks_on_every_head():
    labels = blob_with_hole_and_speck()
    for post in (PostProcess(min_area=2), PostProcess(smooth=1), PostProcess(smooth=1, smooth_method="open")):
        out = postprocess(MaskSet(labels), post).labels
        assert out[32, 32] == 0, post
        assert (out[8:22, 8:10] == 1).all() and (out[31:35, 3:7] == 2).all(), post
    layers = np.stack([labels == 1, labels == 2]).astype(np.uint8)
    out = postprocess(MaskSet(labels, layers), PostProcess(min_area=2, fill_holes=True))
    assert out.layers[0, 32, 32] == 0 and out.layers[0, 12:16, 12:16].all() and out.labels[32, 32] == 0


def test_close_fills_gaps_without_taking_other_classes():
    labels = np.zeros((30, 30), np.uint8)
    labels[5:25, 5:14] = 1
    labels[5:25, 15:25] = 1  # a one-pixel gap at column 14
    labels[0:3, 0:3] = 2
    out = postprocess(MaskSet(labels), PostProcess(smooth=2, smooth_method="close")).labels
    assert (out[8:22, 14] == 1).all() and (out[0:3, 0:3] == 2).all()


def test_post_processing_applies_to_every_mask_format(binary):
    # A ramp with a dark notch: thresholding leaves a hole that fill_holes closes, in every format alike.
    pixels = np.asarray(green_ramp(64, 32)).copy()
    pixels[12:18, 50:54, 1] = 0
    image = encode_image(Image.fromarray(pixels))
    fields = {"body": image, "fill_holes": b"true"}
    mask = png_mask(ask(binary, {**fields, "format": b"png"}))
    assert (mask[12:18, 50:54] == 1).all()
    body = json.loads(ask(binary, {**fields, "format": b"json"}).body)
    assert body["classes"][1]["pixels"] == int((mask == 1).sum())
    rle = json.loads(ask(binary, {**fields, "format": b"rle"}).body)["classes"][1]["rle"]
    assert (coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}) == (mask == 1)).all()
    instances = json.loads(ask(binary, {**fields, "format": b"instances"}).body)["instances"]
    assert [i["area"] for i in instances] == [int((mask == 1).sum())]
    overlay = ask(binary, {**fields, "format": b"overlay"})
    assert overlay.status == 200 and overlay.content_type == "image/jpeg"


# -- tiling --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head, model, threshold", [("binary", GreenLogit(), 0.3), ("multilabel", RedBlueLogits(), 0.7),
                                                    ("softmax", None, 0.6)])
def test_a_tiled_image_that_fits_one_window_gives_the_untiled_masks(head, model, threshold):
    from support.handlers import ChannelArgmax

    model = (model or ChannelArgmax()).eval()
    image = green_ramp(48, 40) if head == "binary" else red_blue(48, 40)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    from segserve.transforms import to_model_input

    logits = model(to_model_input(image, (40, 48), mean, std)[None])[0]
    untiled = heads.decide(heads.get(head), logits, 40, 48, threshold)
    tiled = tiling.sliding_window(image, model, (40, 48), 0.25, 4, mean, std,
                                  lambda band: heads.decide(heads.get(head), band, band.shape[1], band.shape[2],
                                                            threshold))
    assert (tiled == untiled).all()


# -- instances --------------------------------------------------------------------------------------------
def test_instances_count_the_nuclei_of_the_docs_sample_as_the_generator_drew_them(tmp_path):
    from segserve.tools.inprocess import load_handler

    pixels, truth = generate_scene(2024, (384, 512))  # docs/sample-input.png (scripts/make_figures.py)
    handler = load_handler(REPO / "model")
    reply = ask(handler, {"body": encode_image(Image.fromarray(pixels)), "format": b"instances",
                          "classes": b"nucleus", "min_area": b"30", "instance_mask": b"true"})
    body = json.loads(reply.body)
    expected = postprocess(MaskSet(truth), PostProcess(min_area=30))
    from segserve.masks import instances

    _, drawn = instances(expected.binary(2))
    assert body["counts"] == [{"id": 2, "name": "nucleus", "count": len(drawn)}] and len(drawn) >= 10
    ids = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["instance_mask"]))))
    assert ids.dtype == np.uint16 and sorted(np.unique(ids))[1:] == [i["id"] for i in body["instances"]]
    for entry in body["instances"]:
        assert (ids == entry["id"]).sum() == entry["area"]
        x, y, w, h = entry["bbox"]
        assert x <= entry["centroid"][0] <= x + w and y <= entry["centroid"][1] <= y + h


def test_config_postprocess_defaults_are_strict():
    base = {"model": {"name": "m", "arch": "unet", "weights": "w"}, "classes": ["background", "x"],
            "input": {"size": 32}}
    config = ServingConfig.from_dict({**base, "postprocess": {"threshold": 0.7, "smooth": 2, "fill_holes": True}})
    assert (config.postprocess.threshold, config.postprocess.smooth, config.postprocess.fill_holes) == (0.7, 2, True)
    for bad, words in (({"threshold": 2}, "[0, 1]"), ({"smoth": 1}, "did you mean handler.postprocess.smooth"),
                       ({"smooth_method": "blur"}, "median, open, close"), ({"ignore_label": 300}, "0..255")):
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            ServingConfig.from_dict({**base, "postprocess": bad})
    with pytest.raises(ValueError, match="softmax, binary, multilabel"):
        ServingConfig.from_dict({**base, "model": {**base["model"], "head": "sigmoid"}})
