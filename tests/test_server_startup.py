"""A model whose workers cannot load is reported at once, with the reason, instead of crash-looping quietly;
and the health endpoints say so (docs/operations.md, Health)."""

import os
import subprocess
import sys
import time
import zipfile

import pytest
import requests
import yaml
from support import REPO

from segserve.client import SegservClient
from segserve.config import ServingConfig
from segserve.tools.build import build
from segserve.tools.server import ServerError, TorchServe, free_ports

pytestmark = pytest.mark.integration

# The archive's retry window, shortened from the shipped model-config.yaml's so the test is quick.
RETRY_WINDOW_S = 8


def test_broken_archive_fails_fast_and_turns_unhealthy(tmp_path):
    config = REPO / "model" / "model-config.yaml"
    assert yaml.safe_load(config.read_text())["maxRetryTimeoutInSec"] > 0  # the shipped archive bounds the loop
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
                doc["maxRetryTimeoutInSec"] = RETRY_WINDOW_S
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

        # Once the retry window has passed, /ping answers 500 Unhealthy (bounded wait, not a timing claim).
        deadline = time.monotonic() + RETRY_WINDOW_S + 90
        while True:
            ping = requests.get(f"{ts.inference_url}/ping", headers=ts.headers(), timeout=10)
            if ping.status_code != 200 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert ping.status_code == 500 and ping.json() == {"status": "Unhealthy"}
        # The management API shows why: no READY worker.
        described = requests.get(f"{ts.management_url}/models/segmenter", headers=ts.headers("management"),
                                 timeout=10).json()[0]
        assert not [w for w in described["workers"] if w["status"] == "READY"], described["workers"]
        # The project's probes agree: the client's health() and the container's health check.
        health = SegservClient(ts.inference_url, key_file=ts.workdir / "key_file.json",
                               management_url=ts.management_url).health()
        assert health["healthy"] is False and health["ping"]["status"] == "Unhealthy", health
        check = subprocess.run([sys.executable, str(REPO / "docker" / "healthcheck.py")], capture_output=True,
                               text=True, timeout=60, env=dict(os.environ, SEGSERVE_INFERENCE_PORT=str(
                                   ts.ports["inference"]), SEGSERVE_WORKDIR=str(ts.workdir)))
        assert check.returncode == 1, check.stdout
    finally:
        ts.stop()
