"""Shared fixtures: the default config and model, and (for integration tests) a real TorchServe.
Shared helpers that are not fixtures live in tests/support."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from support import MODEL, MODEL_CONFIG, REPO, torchserve  # noqa: E402

from segserve.config import ServingConfig  # noqa: E402
from segserve.pipeline import Segmenter  # noqa: E402
from segserve.tools.build import build  # noqa: E402
from segserve.tools.inprocess import load_handler  # noqa: E402


@pytest.fixture(scope="session")
def config() -> ServingConfig:
    return ServingConfig.from_yaml(MODEL_CONFIG)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> Path:
    """A model store holding segmenter.mar built from model/ (built once per run)."""
    store = tmp_path_factory.mktemp("store") / "model-store"
    build(MODEL, MODEL_CONFIG, REPO / "model" / ServingConfig.from_yaml(MODEL_CONFIG).weights, store)
    return store


@pytest.fixture(scope="session")
def server(tmp_path_factory, model_store):
    """One real TorchServe for the whole run: the archive built from model/, free loopback ports, token auth."""
    root = tmp_path_factory.mktemp("torchserve")
    store = model_store
    with torchserve(root, store, [f"{MODEL}={MODEL}.mar"], [MODEL]) as ts:
        yield ts


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
    with torchserve(root, store, [f"{MODEL}-1.0.mar", f"{MODEL}-2.0.mar"], [f"{MODEL}/1.0", f"{MODEL}/2.0"],
                    extra_properties=(("enable_model_api", "true"),)) as ts:
        yield ts
