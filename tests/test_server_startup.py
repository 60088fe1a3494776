"""A model whose workers cannot load is reported at once, with the reason, instead of crash-looping quietly."""

import zipfile

import pytest
import yaml
from conftest import REPO

from segserve.build import build
from segserve.config import ServingConfig
from segserve.server import ServerError, TorchServe, free_ports

pytestmark = pytest.mark.integration


def test_broken_archive_fails_fast_with_the_worker_error(tmp_path):
    config = REPO / "model" / "model-config.yaml"
    store = tmp_path / "store"
    mar = build("segmenter", config, REPO / "model" / ServingConfig.from_yaml(config).weights, store)
    # Break it after the build-time check: point the config at a weights file the archive lacks.
    broken = store / "broken.mar"
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "model-config.yaml":
                doc = yaml.safe_load(data)
                doc["handler"]["model"]["weights"] = "missing.safetensors"
                data = yaml.safe_dump(doc).encode()
            dst.writestr(item, data)
    ts = TorchServe(workdir=tmp_path / "run", model_store=store, base_config=REPO / "config.properties",
                    ports=free_ports("inference", "management", "metrics", "grpc_inference", "grpc_management"),
                    models=("segmenter=broken.mar",))
    ts.start()
    try:
        with pytest.raises(ServerError) as info:
            ts.wait_ready("segmenter", timeout=180)
        message = str(info.value)
        assert "failed while loading" in message
        assert "missing.safetensors" in message
    finally:
        ts.stop()
