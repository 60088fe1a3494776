"""The container's entrypoint and health check (segserve.tools.probe), run as plain scripts outside a container;
tests/test_container.py runs them in the image."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from support import MODEL, REPO, encode_image, random_image
from v2_client import image_input, parse, request_body

from segserve.tools.probe import KeyFile, ProbeError
from segserve.tools.server import TorchServe, free_ports, java_environment, stop_process_group
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


def test_what_torchserve_writes_goes_under_the_workdir(tmp_path):
    """A read-only image needs one writable folder: the temp dir, pid file and logs default into the workdir."""
    env = load_entrypoint().runtime_environment({"LOG_LOCATION": str(tmp_path / "elsewhere")}, tmp_path / "work")
    assert env["TEMP"] == env["TMPDIR"] == str(tmp_path / "work" / "tmp")
    assert env["METRICS_LOCATION"] == str(tmp_path / "work" / "logs")
    assert env["LOG_LOCATION"] == str(tmp_path / "elsewhere")  # a setting of the user's stays
    assert all(Path(env[name]).is_dir() for name in ("TEMP", "LOG_LOCATION", "METRICS_LOCATION"))


def test_inference_ports_come_from_the_config_torchserve_reads(tmp_path):
    entrypoint = load_entrypoint()
    config = tmp_path / "config.properties"
    config.write_text("inference_address=http://0.0.0.0:9080\ngrpc_inference_port=9070\n")
    assert entrypoint.inference_ports(["torchserve", "--start", f"--ts-config={config}"], {}) == {9080, 9070}
    assert entrypoint.inference_ports(["torchserve", "--ts-config", str(config)],
                                      {"TS_INFERENCE_ADDRESS": "http://127.0.0.1:7777"}) == {7777, 9070}


@pytest.mark.skipif(not shutil.which("ss"), reason="needs iproute2's ss (the image has it)")
def test_requests_in_flight_are_unanswered_requests_not_idle_connections():
    """The drain's view of real TCP connections: busy from a request's arrival until its answer is sent;
    a keep-alive connection idle after its answer does not hold the stop up."""
    entrypoint = load_entrypoint()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert entrypoint.requests_in_flight({port}) == 0
        with socket.create_connection(("127.0.0.1", port)) as client:
            served, _ = listener.accept()
            with served:
                time.sleep(0.05)  # tcp_info counts whole milliseconds
                client.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                time.sleep(0.05)
                assert entrypoint.requests_in_flight({port}) == 1  # in the server's receive queue
                served.recv(1000)
                time.sleep(0.05)
                assert entrypoint.requests_in_flight({port}) == 1  # read, not answered
                served.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                client.recv(1000)
                time.sleep(0.05)
                assert entrypoint.requests_in_flight({port}) == 0  # answered: idle keep-alive
                client.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                time.sleep(0.05)
                assert entrypoint.requests_in_flight({port}) == 1  # the next request on the same connection
                assert entrypoint.requests_in_flight({port + 1 if port < 65535 else port - 1}) == 0


def key_file(path: Path, expires: datetime) -> Path:
    """A key_file.json as TorchServe 0.12 writes it (TokenAuthorization.generateKeyFile)."""
    stamp = expires.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    path.write_text(json.dumps({"management": {"key": "m-key", "expiration time": stamp},
                                "inference": {"key": "i-key", "expiration time": stamp}, "API": {"key": "api-key"}}))
    return path


def test_a_valid_key_is_used_as_it_is_and_an_expired_one_is_renewed(tmp_path):
    closed = f"http://127.0.0.1:{free_ports()['0']}"  # no TorchServe: any renewal attempt fails
    now = datetime.now(UTC)
    valid = KeyFile(key_file(tmp_path / "valid.json", now + timedelta(minutes=10)), closed)
    assert (valid.key("inference"), valid.key("management")) == ("i-key", "m-key")  # no call made
    expired = KeyFile(key_file(tmp_path / "expired.json", now - timedelta(seconds=1)), closed)
    with pytest.raises(ProbeError, match="no answer from .*/token\\?type=inference"):
        expired.key("inference")
    # About to expire counts as expired: a probe must not see its key lapse in the middle of its calls.
    soon = KeyFile(key_file(tmp_path / "soon.json", now + timedelta(seconds=2)), closed)
    with pytest.raises(ProbeError, match="type=management"):
        soon.key("management")
    (tmp_path / "bad.json").write_text('{"inference": {"key": "x"}}')
    with pytest.raises(ProbeError, match="not TorchServe's key file"):
        KeyFile(tmp_path / "bad.json", closed).read(wait=0)


@pytest.mark.integration
def test_entrypoint_serves_health_outlives_key_expiry_and_sigterm_drains(tmp_path, model_store):
    """The entrypoint on env settings; keys that expire after 6 s (TorchServe reads token_expiration_min as
    a double; its variable is TS_TOKEN_EXPIRATION_TIME_MIN, ConfigManager's field name): the health check and
    make serve's wait keep working past the expiry; health fails with no READY worker; SIGTERM with a
    request in flight answers it before TorchServe stops."""
    ports = free_ports("inference", "management", "metrics", "grpc_inference", "grpc_management")
    workdir = tmp_path / "work"
    # PYTHONPATH: this checkout's segserve, as the image installs it (the venv's may be another checkout's).
    env = {**os.environ, **java_environment(), "PYTHONPATH": str(REPO / "src"),
           "SEGSERVE_MODEL_STORE": str(model_store), "SEGSERVE_CONFIG": str(REPO / "config.properties"),
           "SEGSERVE_BIND": "127.0.0.1", "SEGSERVE_WORKDIR": str(workdir), "SEGSERVE_WORKERS": "2",
           "TS_TOKEN_EXPIRATION_TIME_MIN": "0.1",
           **{f"SEGSERVE_{name.upper()}_PORT": str(port) for name, port in ports.items()}}
    for name in ("TEMP", "TMPDIR", "LOG_LOCATION", "METRICS_LOCATION"):
        env.pop(name, None)  # the entrypoint's defaults: all under SEGSERVE_WORKDIR
    health = [sys.executable, str(HEALTHCHECK)]
    assert subprocess.run(health, env=env, capture_output=True, timeout=30).returncode == 1  # not up yet
    with open(tmp_path / "out.log", "wb") as out:
        process = subprocess.Popen([sys.executable, str(ENTRYPOINT)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        url = f"http://127.0.0.1:{ports['inference']}"
        deadline = time.monotonic() + 240
        while (check := subprocess.run(health, env=env, capture_output=True, text=True, timeout=30)).returncode:
            assert process.poll() is None, (tmp_path / "out.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"the health check never passed: {check.stdout}"
            time.sleep(1)
        assert (workdir / "tmp").is_dir() and (workdir / "logs" / "ts_log.log").is_file()
        assert requests.get(f"{url}/ping", timeout=10).status_code in (400, 401)  # token auth stays on

        # The keys expire: TorchServe refuses the first inference key once its time is up...
        doc = json.loads((workdir / "key_file.json").read_text())
        first, expiry = doc["inference"]["key"], KeyFile.expires(doc, "inference")
        assert expiry - datetime.now(UTC) < timedelta(minutes=1)
        time.sleep(max(0.0, (expiry - datetime.now(UTC)).total_seconds()) + 1)
        refused = requests.get(f"{url}/ping", headers={"Authorization": f"Bearer {first}"}, timeout=10)
        assert refused.status_code == 400 and "InvalidKeyException" in refused.text
        # ...and the health check renews it with the API key and passes.
        check = subprocess.run(health, env=env, capture_output=True, text=True, timeout=60)
        assert check.returncode == 0 and f"{MODEL} 2/2 READY" in check.stdout, check.stdout
        renewed = json.loads((workdir / "key_file.json").read_text())["inference"]["key"]
        assert renewed != first
        assert requests.get(f"{url}/ping", headers={"Authorization": f"Bearer {renewed}"}, timeout=10).ok

        # make serve's wait and the tests' keys, on the same server, past further expiries.
        server = TorchServe(workdir=workdir, model_store=model_store, base_config=REPO / "config.properties",
                            ports=ports)
        time.sleep(7)
        assert len(server.wait_ready(MODEL, workers=2, timeout=120)["workers"]) == 2
        body, headers = request_body(image_input(encode_image(random_image(40, 30)), True))
        response = requests.post(f"{url}/v2/models/{MODEL}/infer", data=body,
                                 headers={**server.headers(), **headers}, timeout=60)
        assert response.status_code == 200, response.text[:300]
        assert parse(response.content, response.headers).as_numpy("mask").shape == (30, 40)

        # No READY worker, no health (/ping alone says Healthy for a model scaled to 0).
        scale = f"{server.management_url}/models/{MODEL}?synchronous=true"
        assert requests.put(f"{scale}&min_worker=0&max_worker=0", headers=server.headers("management"),
                            timeout=120).ok
        assert requests.get(f"{url}/ping", headers=server.headers(), timeout=10).json() == {"status": "Healthy"}
        check = subprocess.run(health, env=env, capture_output=True, text=True, timeout=60)
        assert check.returncode == 1 and "no READY worker" in check.stdout, check.stdout
        assert requests.put(f"{scale}&min_worker=1&max_worker=1", headers=server.headers("management"),
                            timeout=180).ok
        assert subprocess.run(health, env=env, capture_output=True, timeout=60).returncode == 0

        # SIGTERM while a request is being served: it is answered, then TorchServe stops.
        entrypoint = load_entrypoint()
        image, answer = encode_image(random_image(1000, 1000, seed=3)), {}
        auth = {**server.headers(), "Accept": "image/png"}
        sender = threading.Thread(target=lambda: answer.update(response=requests.post(
            f"{url}/predictions/{MODEL}", data=image, headers=auth, timeout=120)))
        sender.start()
        while not entrypoint.requests_in_flight({ports["inference"]}) and sender.is_alive():
            time.sleep(0.01)
        assert sender.is_alive(), "the request was answered before SIGTERM could be sent"
        process.send_signal(signal.SIGTERM)
        sender.join(timeout=120)
        assert answer["response"].status_code == 200 and answer["response"].content.startswith(b"\x89PNG")
        assert process.wait(timeout=60) == 0
        assert "request(s) in flight" in (tmp_path / "out.log").read_text()
    finally:
        stop_process_group(process.pid)


def test_gpu_dockerfile_is_the_cpu_one_with_cuda_wheels():
    """Dockerfile.gpu differs from Dockerfile only in its header, its torch wheel source, the NVIDIA variables
    and a longer health-check start period, so the two cannot drift (and share their layers up to deps)."""
    def body(name: str) -> list[str]:
        lines = (REPO / "docker" / name).read_text().splitlines()
        return lines[next(i for i, line in enumerate(lines) if line.startswith("ARG BASE_IMAGE")):]

    cpu, gpu = body("Dockerfile"), body("Dockerfile.gpu")
    allowed = {"ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu", "ARG TORCH_INDEX_URL=",
               "    SEGSERVE_WORKDIR=/home/model-server/run", "    SEGSERVE_WORKDIR=/home/model-server/run \\",
               "    NVIDIA_VISIBLE_DEVICES=all \\", "    NVIDIA_DRIVER_CAPABILITIES=compute,utility"}
    differing = {line for line in set(cpu) ^ set(gpu) if not line.startswith("HEALTHCHECK")}
    assert differing <= allowed, sorted(differing - allowed)
    assert [line for line in cpu if not line.startswith("HEALTHCHECK")][-1] == gpu[-1]  # same ENTRYPOINT
