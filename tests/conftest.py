"""Shared fixtures: the default config, small images, and (for integration tests) a real TorchServe."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "handler"))

from segserve.config import ServingConfig  # noqa: E402

MODEL_CONFIG = REPO / "model" / "model-config.yaml"


@pytest.fixture(scope="session")
def config() -> ServingConfig:
    return ServingConfig.from_yaml(MODEL_CONFIG)


def encode_image(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width, channels) if channels else (height, width)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode)
