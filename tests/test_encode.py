"""Mask encoders: indexed PNG keeps class ids and palette; JSON summarises classes."""

import base64
import io
import json

import numpy as np
from PIL import Image

from segserve.encoders import class_summary, json_response, mask_to_png


def sample_mask(height=31, width=47):
    mask = np.zeros((height, width), np.uint8)
    mask[5:20, 3:30] = 1
    mask[8:12, 10:14] = 2
    return mask


def test_png_is_indexed_with_palette_and_exact_ids(config):
    mask = sample_mask()
    image = Image.open(io.BytesIO(mask_to_png(mask, config.palette)))
    assert image.format == "PNG" and image.mode == "P"
    assert image.size == (47, 31)
    assert np.array_equal(np.asarray(image), mask)
    assert image.getpalette()[3:6] == list(config.classes[1].color)


def test_class_summary_counts_and_fractions(config):
    mask = sample_mask()
    summary = class_summary(mask, config)
    assert [c["name"] for c in summary] == config.class_names
    assert sum(c["pixels"] for c in summary) == mask.size
    assert summary[2]["pixels"] == 16
    assert abs(summary[2]["fraction"] - 16 / mask.size) < 1e-6


def test_json_response_fields(config):
    mask = sample_mask()
    body = json.loads(json_response(mask, config))
    assert set(body) >= {"model", "version", "width", "height", "classes", "mask"}
    assert (body["width"], body["height"]) == (47, 31)
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask"]))))
    assert np.array_equal(decoded, mask)
