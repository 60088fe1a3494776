"""Shared fixtures: the default config, small images, and (for integration tests) a real TorchServe."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from segserve.config import ServingConfig  # noqa: E402
from segserve.pipeline import Segmenter  # noqa: E402
from segserve.tools.build import build  # noqa: E402
from segserve.tools.inprocess import load_handler  # noqa: E402
from segserve.tools.server import TorchServe, free_ports  # noqa: E402

MODEL_CONFIG = REPO / "model" / "model-config.yaml"
MODEL = "segmenter"


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


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> Path:
    """A model store holding segmenter.mar built from model/ (built once per run)."""
    store = tmp_path_factory.mktemp("store") / "model-store"
    build(MODEL, MODEL_CONFIG, REPO / "model" / ServingConfig.from_yaml(MODEL_CONFIG).weights, store)
    return store


def miou(mask: np.ndarray, truth: np.ndarray) -> float:
    """Mean IoU over the default model's 3 classes (a class absent from both counts as 0)."""
    return np.mean([((mask == c) & (truth == c)).sum() / max(((mask == c) | (truth == c)).sum(), 1)
                    for c in range(3)])


@pytest.fixture(scope="session")
def server(tmp_path_factory, model_store):
    """One real TorchServe for the whole run: the archive built from model/, free loopback ports, token auth."""
    root = tmp_path_factory.mktemp("torchserve")
    store = model_store
    ts = TorchServe(workdir=root / "run", model_store=store, base_config=REPO / "config.properties",
                    ports=free_ports("inference", "management", "metrics", "grpc_inference", "grpc_management"),
                    models=(f"{MODEL}={MODEL}.mar",))
    ts.start()
    try:
        ts.wait_ready(MODEL, timeout=240)
        yield ts
    finally:
        ts.stop()


@pytest.fixture(scope="session")
def reference(config):
    """The in-process pipeline on the same weights: what the server must answer."""
    return Segmenter.from_model_dir(REPO / "model", config=config)


@pytest.fixture(scope="session")
def handler():
    """segmenter_handler.py on model/, initialized and called in this process as a TorchServe worker does it."""
    return load_handler(REPO / "model")


@pytest.fixture(scope="session")
def ops_server(tmp_path_factory):
    """A TorchServe as docs/operations.md turns it for management: the model API on (TS_ENABLE_MODEL_API=true),
    versions 1.0 and 2.0 of the default model loaded from their own archives. Its own, since its tests
    register, unregister and rotate keys."""
    root = tmp_path_factory.mktemp("ops")
    store = root / "model-store"
    weights = REPO / "model" / ServingConfig.from_yaml(MODEL_CONFIG).weights
    for version in ("1.0", "2.0"):
        build(MODEL, MODEL_CONFIG, weights, store, version=version, archive_name=f"{MODEL}-{version}")
    ts = TorchServe(workdir=root / "run", model_store=store, base_config=REPO / "config.properties",
                    ports=free_ports("inference", "management", "metrics", "grpc_inference", "grpc_management"),
                    models=(f"{MODEL}-1.0.mar", f"{MODEL}-2.0.mar"), extra_properties=(("enable_model_api", "true"),))
    ts.start()
    try:
        for version in ("1.0", "2.0"):
            ts.wait_ready(f"{MODEL}/{version}", timeout=240)
        yield ts
    finally:
        ts.stop()
