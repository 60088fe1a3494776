"""The image built and run for real with podman or docker, hardened as docs/deploy.md runs it (read-only root,
one tmpfs, every capability dropped): `make test-container`.

Only with SEGSERVE_CONTAINER_TESTS=1 (make test-container sets it; `make test` skips these) and a container
engine (CONTAINER_ENGINE, else podman or docker on the PATH). The image is SEGSERVE_TEST_IMAGE when set
(make test-container builds it first), else `make image` builds it here with the environment's IMAGE_BASE,
TORCH_INDEX_URL and IMAGE_BUILD_FLAGS. TorchServe keys expire after one minute in this container
(TS_TOKEN_EXPIRATION_TIME_MIN=1), so the health check is seen to outlive them.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from support import MODEL, REPO, encode_image, random_image
from support.handlers import ask
from test_docker_entrypoint import load_entrypoint

from segserve.tools import torchserve_config
from segserve.tools.probe import KeyFile
from segserve.tools.server import free_ports

ENGINE = os.environ.get("CONTAINER_ENGINE") or shutil.which("podman") or shutil.which("docker")
PODMAN = bool(ENGINE) and Path(ENGINE).name == "podman"
HOME = "/home/model-server"
pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(not os.environ.get("SEGSERVE_CONTAINER_TESTS"),
                       reason="container tests run with `make test-container` (SEGSERVE_CONTAINER_TESTS=1)"),
    pytest.mark.skipif(not ENGINE, reason="no container engine (podman or docker) on the PATH"),
]


def engine(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([ENGINE, *args], capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def image() -> str:
    name = os.environ.get("SEGSERVE_TEST_IMAGE")
    if not name:
        name = "segserve:test"
        subprocess.run(["make", "--no-print-directory", "image", f"IMAGE={name}", f"CONTAINER_ENGINE={ENGINE}"],
                       cwd=REPO, check=True, timeout=3600)
    return name


class Container:
    """One running container of the image, its published ports, and what a test asks of it."""

    def __init__(self, image: str):
        self.name = f"segserve-test-{uuid.uuid4().hex[:8]}"
        self.ports = free_ports("inference", "management")
        # The writable tmpfs for SEGSERVE_WORKDIR, owned by the image's uid (podman 4's --tmpfs ignores mode=).
        writable = (["--read-only-tmpfs=false", "--mount", f"type=tmpfs,destination={HOME}/run,chown=true"] if PODMAN
                    else ["--tmpfs", f"{HOME}/run:rw,mode=1777"])
        self.started = time.monotonic()
        engine("run", "-d", "--name", self.name, "--read-only", *writable, "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges", "-p", f"127.0.0.1:{self.ports['inference']}:8080",
               "-p", f"127.0.0.1:{self.ports['management']}:8081", "-e", "TS_TOKEN_EXPIRATION_TIME_MIN=1", image)
        self.url = f"http://127.0.0.1:{self.ports['inference']}"
        self.management_url = f"http://127.0.0.1:{self.ports['management']}"

    def health(self) -> subprocess.CompletedProcess:
        """The image's HEALTHCHECK, run the way the engine runs it; stdout is the check's own output."""
        if PODMAN:
            run = engine("healthcheck", "run", self.name, check=False)
            log = json.loads(engine("inspect", "--format", "{{json .State.Health}}", self.name).stdout)["Log"]
            return subprocess.CompletedProcess(run.args, run.returncode, log[-1]["Output"] if log else "", run.stderr)
        test = json.loads(engine("inspect", "--format", "{{json .Config.Healthcheck.Test}}", self.name).stdout)
        return engine("exec", self.name, *test[1:], check=False)

    def running(self) -> bool:
        return engine("inspect", "--format", "{{.State.Running}}", self.name).stdout.strip() == "true"

    def exec_python(self, code: str) -> str:
        return engine("exec", self.name, "python", "-c", code).stdout.strip()

    def key(self, api: str = "inference") -> str:
        """A valid key, renewed inside the container if it has expired (segserve.tools.probe)."""
        return self.exec_python("from pathlib import Path; from segserve.tools.probe import KeyFile; "
                                f"print(KeyFile(Path('run/key_file.json'), 'http://127.0.0.1:8081').key('{api}'))")

    def auth(self, api: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key(api)}"}

    def workers(self) -> list[dict]:
        return requests.get(f"{self.management_url}/models/{MODEL}", headers=self.auth("management"),
                            timeout=30).json()[0]["workers"]

    def scale(self, workers: int, timeout: float = 300) -> None:
        """Scale through the management API and wait for exactly that many READY workers. Asynchronously:
        TorchServe 0.12 answers a synchronous scale to 0 with 500 "Failed to start workers" once it is done."""
        answer = requests.put(f"{self.management_url}/models/{MODEL}?min_worker={workers}&max_worker={workers}",
                              headers=self.auth("management"), timeout=60)
        assert answer.status_code == 202, answer.text
        deadline = time.monotonic() + timeout
        while not ((now := self.workers()) is not None and len(now) == workers
                   and all(w["status"] == "READY" for w in now)):
            assert time.monotonic() < deadline, f"not {workers} READY workers: {now}"
            time.sleep(0.5)

    def logs(self) -> str:
        result = engine("logs", self.name, check=False)
        return result.stdout + result.stderr


@pytest.fixture(scope="module")
def container(image):
    running = Container(image)
    try:
        deadline = time.monotonic() + 300
        while (check := running.health()).returncode:
            assert running.running(), running.logs()[-3000:]
            assert time.monotonic() < deadline, f"never healthy: {check.stdout}{check.stderr}\n{running.logs()[-3000:]}"
            time.sleep(1)
        print(f"\n{image}: healthy {time.monotonic() - running.started:.1f} s after `run`")
        yield running
    finally:
        engine("rm", "-f", running.name, check=False)


def test_image_runs_as_non_root_with_no_compiler_no_secret_and_the_repositorys_config(image):
    def inspect(field: str):  # templates both engines resolve (podman's JSON keeps Healthcheck outside Config)
        return json.loads(engine("image", "inspect", "--format", f"{{{{json .Config.{field}}}}}", image).stdout)

    config = {field: inspect(field) for field in ("User", "Entrypoint", "Healthcheck", "Env")}
    assert config["User"] == "1000:1000"
    assert config["Entrypoint"][:2] == ["tini", "--"]  # PID 1 reaps and forwards SIGTERM to the entrypoint
    assert config["Healthcheck"]["Test"][-1].endswith("healthcheck.py")  # kept: built in the docker format
    env = dict(item.split("=", 1) for item in config["Env"])
    assert not [k for k in env if k.startswith("TS_")]  # TorchServe's settings come from config.properties only
    defaults = load_entrypoint().DEFAULTS  # the image sets what the entrypoint documents, and one folder to write
    assert {k: env[k] for k in env if k in defaults} == {**{k: defaults[k] for k in env if k in defaults},
                                                           "SEGSERVE_WORKDIR": f"{HOME}/run"}
    size = int(engine("image", "inspect", "--format", "{{.Size}}", image).stdout)
    print(f"\n{image}: {size / 1e9:.2f} GB")
    # No compiler, no TorchServe key, private key or pip configuration (a local build mounts its pip.conf and CA
    # bundle, which leave empty mount points only); the settings are the repository's config.properties.
    found = engine("run", "--rm", "--entrypoint", "sh", image, "-c",
                   "for tool in gcc cc c++ g++ clang make ld as; do command -v $tool; done;"
                   " find / -xdev -name key_file.json 2>/dev/null; grep -rls 'PRIVATE KEY' /etc /home 2>/dev/null;"
                   " test -s /etc/pip.conf && echo /etc/pip.conf has content; true", check=False)
    assert found.stdout.strip() == "", found.stdout
    shipped = engine("run", "--rm", "--entrypoint", "cat", image, f"{HOME}/config.properties").stdout
    assert shipped == (REPO / "config.properties").read_text()


def test_gpu_image_builds_on_the_same_base_with_cuda_wheels(image):
    """docker/Dockerfile.gpu on the build arguments the CPU image got (a stand-in base where no registry is
    reachable; its layers up to the dependencies are the CPU image's when the wheel source is the same).
    Running it needs a GPU host; here torch only says it was built for CUDA and finds none."""
    name = "segserve:gpu-test"
    subprocess.run(["make", "--no-print-directory", "image", "DOCKERFILE=docker/Dockerfile.gpu", f"IMAGE={name}",
                    f"CONTAINER_ENGINE={ENGINE}"], cwd=REPO, check=True, timeout=3600, capture_output=True)
    try:
        env = json.loads(engine("image", "inspect", "--format", "{{json .Config.Env}}", name).stdout)
        assert "NVIDIA_VISIBLE_DEVICES=all" in env and "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env
        built = engine("run", "--rm", "--entrypoint", "python", name, "-c",
                       "import torch; print(torch.version.cuda is not None, torch.cuda.is_available())").stdout
        assert built.split() == ["True", "False"]
    finally:
        engine("rmi", name, check=False)


def test_readme_requests_answer_the_in_process_mask(container, handler):
    sample = (REPO / "docs" / "sample-input.png").read_bytes()
    expected = np.asarray(Image.open(io.BytesIO(ask(handler, {"body": sample}, {"Accept": "image/png"}).body)))
    # JSON: sizes, per-class counts and the mask as base64 PNG
    answer = requests.put(f"{container.url}/predictions/{MODEL}", data=sample, headers=container.auth(), timeout=120)
    assert answer.status_code == 200, answer.text[:300]
    doc = answer.json()
    assert (doc["width"], doc["height"]) == (512, 384) and doc["mask_format"] == "png;base64"
    assert (np.asarray(Image.open(io.BytesIO(base64.b64decode(doc["mask"])))) == expected).all()
    assert [c["pixels"] for c in doc["classes"]] == [int((expected == i).sum()) for i in range(len(doc["classes"]))]
    # the mask itself as an indexed PNG
    png = requests.put(f"{container.url}/predictions/{MODEL}", data=sample,
                       headers={**container.auth(), "Accept": "image/png"}, timeout=120)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert (np.asarray(Image.open(io.BytesIO(png.content))) == expected).all()


def test_a_bad_image_gets_a_json_400(container):
    answer = requests.put(f"{container.url}/predictions/{MODEL}", data=b"\x89PNG\r\n\x1a\nnot really",
                          headers=container.auth(), timeout=60)
    assert answer.status_code == 400 and answer.headers["content-type"].startswith("application/json")
    assert answer.json()["code"] == 400 and answer.json()["type"] == "invalid_image", answer.text


def test_torchserve_reads_the_repositorys_config_with_only_the_containers_overrides(container):
    """The TS_*/entrypoint configuration is config.properties through torchserve_config.container, the
    function and file `make serve` derives its own from (tests/test_torchserve_config.py)."""
    written = engine("exec", container.name, "cat", f"{HOME}/run/config.properties").stdout
    entrypoint = load_entrypoint()
    ports = {name: entrypoint.DEFAULTS[f"SEGSERVE_{name.upper()}_PORT"]
             for name in ("inference", "management", "metrics", "grpc_inference", "grpc_management")}
    store = Path(f"{HOME}/model-store")
    expected = torchserve_config.container(REPO / "config.properties", bind="0.0.0.0", ports=ports, model_store=store,
                                           models={MODEL: store / f"{MODEL}.mar"})
    assert written == expected.text()


def test_workers_scale_through_the_management_api_and_health_fails_without_one(container):
    container.scale(2)
    assert container.health().returncode == 0
    container.scale(0)
    check = container.health()
    assert check.returncode != 0 and "no READY worker" in check.stdout + check.stderr, check
    container.scale(1)
    assert container.health().returncode == 0


def test_health_check_outlives_the_one_minute_keys(container):
    doc = json.loads(engine("exec", container.name, "cat", f"{HOME}/run/key_file.json").stdout)
    first = doc["inference"]["key"]
    expiry = KeyFile.expires(doc, "inference")
    time.sleep(max(0.0, (expiry - datetime.now(UTC)).total_seconds()) + 1)
    refused = requests.get(f"{container.url}/ping", headers={"Authorization": f"Bearer {first}"}, timeout=30)
    assert refused.status_code == 400 and "InvalidKeyException" in refused.text
    assert container.health().returncode == 0  # renews the key with the API key, which never expires
    renewed = json.loads(engine("exec", container.name, "cat", f"{HOME}/run/key_file.json").stdout)["inference"]
    assert renewed["key"] != first
    assert requests.get(f"{container.url}/ping", headers={"Authorization": f"Bearer {renewed['key']}"}, timeout=30).ok


def test_sigterm_answers_the_request_in_flight_and_stops_within_10_s(container):
    # A megapixel of noise takes a while to decode, segment and encode: in flight when SIGTERM comes, and
    # answered well within the drain's 5 s on this 2-core machine (a tiled image can take longer).
    image = encode_image(random_image(1000, 1000, seed=5))
    connection = http.client.HTTPConnection("127.0.0.1", container.ports["inference"], timeout=120)
    connection.request("PUT", f"/predictions/{MODEL}", body=image, headers={**container.auth(), "Accept": "image/png"})
    stop = subprocess.Popen([ENGINE, "stop", "-t", "10", container.name], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # SIGTERM now, SIGKILL after 10 s
    answer = connection.getresponse()
    body = answer.read()
    stop.wait(timeout=60)
    assert answer.status == 200 and body.startswith(b"\x89PNG"), body[:300]
    state = json.loads(engine("inspect", "--format", "{{json .State}}", container.name).stdout)
    assert state["Running"] is False and state["ExitCode"] == 0, state  # 137 if SIGKILLed at 10 s
    assert "request(s) in flight" in container.logs()  # the entrypoint drained it
