"""The container's entrypoint and health check, run as plain scripts outside a container (no Docker engine here)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import requests
from support import MODEL, REPO, encode_image, random_image
from v2_client import image_input, parse, request_body

from segserve.tools.server import free_ports, java_environment, stop_process_group
from segserve.tools.torchserve_config import read_properties

ENTRYPOINT = REPO / "docker" / "entrypoint.py"
HEALTHCHECK = REPO / "docker" / "healthcheck.py"


def load_entrypoint():
    spec = importlib.util.spec_from_file_location("segserve_entrypoint", ENTRYPOINT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_become_a_torchserve_command(model_store, tmp_path):
    entrypoint = load_entrypoint()
    env = {"SEGSERVE_MODEL_STORE": str(model_store), "SEGSERVE_CONFIG": str(REPO / "config.properties"),
           "SEGSERVE_INFERENCE_PORT": "9080", "SEGSERVE_WORKERS": "3", "SEGSERVE_TOKEN_AUTH": "false"}
    cmd = entrypoint.serve_command(env, tmp_path)
    assert "--foreground" in cmd
    assert cmd[cmd.index("--ts-config") + 1] == str(tmp_path / "config.properties")
    properties = read_properties(tmp_path / "config.properties")
    assert properties["load_models"] == f"{MODEL}={MODEL}.mar"
    assert properties["model_store"] == str(model_store)
    assert properties["inference_address"] == "http://0.0.0.0:9080"
    assert properties["management_address"] == "http://0.0.0.0:8081"  # SEGSERVE_BIND: every API, in the container
    assert properties["grpc_inference_port"] == "7070"
    assert properties["disable_token_authorization"] == "true"  # SEGSERVE_TOKEN_AUTH=false
    assert json.loads(properties["model_snapshot"])["models"][MODEL]["1.0"]["minWorkers"] == 3
    entrypoint.serve_command({k: v for k, v in env.items() if k not in ("SEGSERVE_TOKEN_AUTH", "SEGSERVE_WORKERS")},
                             tmp_path)
    default = read_properties(tmp_path / "config.properties")
    assert default["disable_token_authorization"] == "false" and "model_snapshot" not in default
    with pytest.raises(entrypoint.EnvironmentSettingError, match="SEGSERVE_METRICS_PORT"):
        entrypoint.serve_command({**env, "SEGSERVE_METRICS_PORT": "http"}, tmp_path)
    with pytest.raises(entrypoint.EnvironmentSettingError, match="no model archive"):
        entrypoint.serve_command({**env, "SEGSERVE_MODELS": "other.mar"}, tmp_path)
    with pytest.raises(entrypoint.EnvironmentSettingError, match="SEGSERVE_WORKDIR"):  # it would overwrite the source
        entrypoint.serve_command({**env, "SEGSERVE_CONFIG": str(tmp_path / "config.properties")}, tmp_path)


def test_kserve_runtime_args_stay_in_the_foreground():
    entrypoint = load_entrypoint()
    args = ["torchserve", "--start", "--model-store=/mnt/models/model-store",
            "--ts-config=/mnt/models/config/config.properties"]
    cmd = entrypoint.passthrough_command(args)
    assert cmd[1:] == args[1:] + ["--foreground"] and cmd[0].endswith("torchserve")
    assert entrypoint.passthrough_command(["bash"]) == ["bash"]


@pytest.mark.integration
def test_entrypoint_serves_with_env_settings_and_healthcheck_passes(tmp_path, model_store):
    ports = free_ports("inference", "management", "metrics", "grpc_inference", "grpc_management")
    workdir, tmp = tmp_path / "work", tmp_path / "tmp"
    workdir.mkdir()
    tmp.mkdir()
    # PYTHONPATH: this checkout's segserve, as the image installs it (the venv's may be another checkout's).
    env = {**os.environ, **java_environment(), "TMPDIR": str(tmp), "TEMP": str(tmp), "PYTHONPATH": str(REPO / "src"),
           "LOG_LOCATION": str(workdir / "logs"), "METRICS_LOCATION": str(workdir / "logs"),
           "SEGSERVE_MODEL_STORE": str(model_store), "SEGSERVE_CONFIG": str(REPO / "config.properties"),
           "SEGSERVE_BIND": "127.0.0.1", "SEGSERVE_WORKDIR": str(workdir), "SEGSERVE_WORKERS": "2",
           **{f"SEGSERVE_{name.upper()}_PORT": str(port) for name, port in ports.items()}}
    health = [sys.executable, str(HEALTHCHECK)]
    assert subprocess.run(health, env=env, capture_output=True, timeout=30).returncode == 1  # not up yet
    with open(tmp_path / "out.log", "wb") as out:
        process = subprocess.Popen([sys.executable, str(ENTRYPOINT)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        url = f"http://127.0.0.1:{ports['inference']}"
        deadline = time.monotonic() + 240
        while subprocess.run(health, env=env, capture_output=True, timeout=30).returncode != 0:
            assert process.poll() is None, (tmp_path / "out.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the health check never passed"
            time.sleep(1)
        keys = json.loads((workdir / "key_file.json").read_text())
        auth = {"Authorization": f"Bearer {keys['inference']['key']}"}
        assert requests.get(f"{url}/ping", timeout=10).status_code in (400, 401)  # token auth stays on
        ready = 0
        while ready < 2:  # SEGSERVE_WORKERS wins over the archive's minWorkers: 1
            assert time.monotonic() < deadline, "2 workers never became READY"
            time.sleep(1)
            described = requests.get(f"http://127.0.0.1:{ports['management']}/models/{MODEL}", timeout=10,
                                     headers={"Authorization": f"Bearer {keys['management']['key']}"}).json()
            workers = described[0]["workers"]
            ready = sum(w["status"] == "READY" for w in workers)
        body, headers = request_body(image_input(encode_image(random_image(40, 30)), True))
        response = requests.post(f"{url}/v2/models/{MODEL}/infer", data=body, headers={**auth, **headers},
                                 timeout=60)
        assert response.status_code == 200, response.text[:300]
        assert parse(response.content, response.headers).as_numpy("mask").shape == (30, 40)
    finally:
        stop_process_group(process.pid)
