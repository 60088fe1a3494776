"""The locked-down defaults, each proven against a real TorchServe: loopback binds, tokens on both APIs,
key rotation, registration only from the model store, no stack traces or paths in error bodies.

(Weights never unpickled: tests/test_own_model.py and the load-time test below. TLS: tests/test_tls.py.)
"""

from __future__ import annotations

import json
import re
import stat
import textwrap
import time

import psutil
import pytest
import requests
import torch
from PIL import Image
from support import MODEL, MODEL_CONFIG, REPO, encode_image, random_image

from segserve.families import load_state_dict
from segserve.tools.build import build

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
TRACE = re.compile(r"Traceback|File \"|\.py\b|line \d+|/(?:home|root|tmp|usr|opt|srv|work|var)/", re.I)


def process_tree(pid: int) -> list[psutil.Process]:
    parent = psutil.Process(pid)
    return [parent, *parent.children(recursive=True)]


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket TorchServe's processes (frontend and workers) listen on."""
    found = []
    for process in process_tree(pid):
        try:
            connections = process.net_connections(kind="inet")
        except psutil.NoSuchProcess:  # a short-lived child (TorchServe's minutely metrics collector) ended
            continue
        found += [(conn.laddr.ip, conn.laddr.port) for conn in connections if conn.status == psutil.CONN_LISTEN]
    return found


# -- binds ---------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_every_listening_socket_is_on_loopback(server):
    sockets = listening(int(server.pid_file.read_text()))
    ports = {port for _, port in sockets}
    # inference, management and metrics (HTTP) and the two gRPC APIs: all there, none beyond loopback.
    assert set(server.ports.values()) <= ports, (server.ports, sockets)
    assert all(address in LOOPBACK for address, _ in sockets), sockets


# -- tokens --------------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("api, method, path", [
    ("inference", "POST", f"/predictions/{MODEL}"),
    ("inference", "GET", "/ping"),
    ("management", "GET", "/models"),
    ("management", "GET", f"/models/{MODEL}"),
    ("management", "PUT", f"/models/{MODEL}?min_worker=1"),
])
def test_missing_or_wrong_token_is_refused(server, api, method, path):
    url = (server.inference_url if api == "inference" else server.management_url) + path
    body = encode_image(random_image(8, 8)) if method == "POST" else None
    other = "management" if api == "inference" else "inference"
    for headers in ({}, {"Authorization": "Bearer not-the-key"}, {"Authorization": server.keys()[api]},
                    server.headers(other)):  # no key, a wrong one, no "Bearer", the other API's key
        response = requests.request(method, url, data=body, headers=headers, timeout=30)
        assert response.status_code == 400, (headers, response.status_code, response.text)
        assert response.json()["type"] == "InvalidKeyException"
    assert requests.request(method, url, data=body, headers=server.headers(api), timeout=60).status_code in (200, 202)


@pytest.mark.integration
def test_key_file_is_private_to_its_owner(server):
    mode = stat.S_IMODE((server.workdir / "key_file.json").stat().st_mode)
    assert mode == 0o600, oct(mode)
    assert set(json.loads((server.workdir / "key_file.json").read_text())) == {"inference", "management", "API"}


@pytest.mark.integration
def test_rotating_a_key_refuses_the_old_one_at_once(ops_server):
    """docs/operations.md: POST /token?type=inference|management with the API key."""
    api_key = json.loads((ops_server.workdir / "key_file.json").read_text())["API"]["key"]
    url = f"{ops_server.management_url}/token"
    for kind, probe in (("inference", f"{ops_server.inference_url}/ping"),
                        ("management", f"{ops_server.management_url}/models")):
        old = ops_server.keys()[kind]
        # Only the API key rotates: the key being rotated (or the other one) cannot.
        for wrong in (old, ops_server.keys()["management" if kind == "inference" else "inference"]):
            refused = requests.post(url, params={"type": kind}, headers={"Authorization": f"Bearer {wrong}"},
                                    timeout=30)
            assert refused.status_code == 400 and ops_server.keys()[kind] == old
        rotated = requests.post(url, params={"type": kind}, headers={"Authorization": f"Bearer {api_key}"},
                                timeout=30)
        assert rotated.status_code == 200, rotated.text
        new = ops_server.keys()[kind]  # re-read from key_file.json
        assert new != old
        assert requests.get(probe, headers={"Authorization": f"Bearer {old}"}, timeout=30).status_code == 400
        assert requests.get(probe, headers={"Authorization": f"Bearer {new}"}, timeout=30).status_code == 200


# -- registration --------------------------------------------------------------------------------------
@pytest.mark.integration
def test_model_api_is_off_by_default(server):
    headers = server.headers("management")
    assert requests.post(f"{server.management_url}/models", params={"url": f"{MODEL}.mar"}, headers=headers,
                         timeout=30).status_code == 405
    assert requests.delete(f"{server.management_url}/models/{MODEL}/1.0", headers=headers,
                           timeout=30).status_code == 405


@pytest.mark.integration
@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/segmenter.mar",
    "https://example.com/models/segmenter.mar",
    "file:///etc/passwd.mar",
])
def test_registering_from_a_url_is_refused(ops_server, url):
    response = requests.post(f"{ops_server.management_url}/models", params={"url": url},
                             headers=ops_server.headers("management"), timeout=30)
    assert response.status_code in (400, 404), response.text
    assert "does not match any allowed URL" in response.json()["message"]


@pytest.mark.integration
def test_a_file_url_outside_the_store_is_refused_even_for_a_real_archive(ops_server, tmp_path):
    outside = build("elsewhere", MODEL_CONFIG, REPO / "model" / "segmenter.safetensors", tmp_path)
    response = requests.post(f"{ops_server.management_url}/models", params={"url": outside.as_uri()},
                             headers=ops_server.headers("management"), timeout=30)
    assert response.status_code in (400, 404) and "does not match any allowed URL" in response.json()["message"]
    assert not (ops_server.model_store / outside.name).exists()  # nothing copied into the store


# -- weights -----------------------------------------------------------------------------------------
def test_loading_pickled_code_is_refused_and_never_runs(tmp_path):
    """What a worker does with the archive's weights (the build refuses them first: test_own_model.py)."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    torch.save({"conv.weight": torch.zeros(1), "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="weights_only|Unsupported global|not an allowed global"):
        load_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


# -- error bodies --------------------------------------------------------------------------------------
FAULTY = textwrap.dedent('''
    import torch.nn as nn

    class Faulty(nn.Module):
        """Segments dark images; fails like a real bug (a message with a server path) on bright ones."""

        def __init__(self, num_classes=2):
            super().__init__()
            self.conv = nn.Conv2d(3, num_classes, kernel_size=1)

        def forward(self, x):
            if x.max() > 1.5:
                raise RuntimeError("cannot read /srv/segserve/secret/cache.bin in faulty_model.py line 12")
            return self.conv(x)
''')


@pytest.fixture(scope="module")
def faulty(ops_server, tmp_path_factory):
    """A model whose forward raises, registered from the model store by name (the only way admitted)."""
    root = tmp_path_factory.mktemp("faulty")
    (root / "faulty_model.py").write_text(FAULTY)
    namespace: dict = {}
    exec(FAULTY, namespace)
    torch.save(namespace["Faulty"]().state_dict(), root / "faulty.pt")
    build("faulty", MODEL_CONFIG, root / "faulty.pt", ops_server.model_store, model_file=root / "faulty_model.py",
          model_class="Faulty", classes=["background", "thing"], input_size=[32, 32], trust_code=True)
    url = f"{ops_server.management_url}/models"
    response = requests.post(url, params={"url": "faulty.mar", "initial_workers": 1, "synchronous": "true"},
                             headers=ops_server.headers("management"), timeout=240)
    assert response.status_code == 200, response.text
    yield "faulty"
    requests.delete(f"{url}/faulty", headers=ops_server.headers("management"), timeout=60)


def wait_for_log_line(ts, pattern: str, timeout: float = 30) -> str:
    """The first model_log.log line matching pattern; the frontend writes worker output asynchronously."""
    deadline = time.monotonic() + timeout
    while True:
        log = (ts.log_dir / "model_log.log").read_text(errors="replace")
        found = [line for line in log.splitlines() if re.search(pattern, line)]
        if found or time.monotonic() > deadline:
            assert found, f"no log line matches {pattern!r}"
            return found[0]
        time.sleep(0.3)


def assert_clean(response: requests.Response) -> dict:
    """A JSON error body that says what went wrong without a stack trace or a server path."""
    assert response.status_code >= 400
    body = response.json()
    assert set(body) >= {"code", "type", "message"}, body
    assert not TRACE.search(response.text), response.text
    return body


@pytest.mark.integration
def test_a_local_archive_from_the_store_is_admitted_and_a_handler_failure_leaks_nothing(ops_server, faulty):
    url = f"{ops_server.inference_url}/predictions/{faulty}"
    headers = ops_server.headers()
    dark = requests.post(url, data=encode_image(Image.new("RGB", (20, 10))), headers=headers, timeout=60)
    assert dark.status_code == 200 and dark.json()["model"] == faulty
    bright = requests.post(url, data=encode_image(Image.new("RGB", (20, 10), "white")), headers=headers, timeout=60)
    body = assert_clean(bright)
    assert bright.status_code in (500, 503) and "/srv/" not in bright.text and "cache.bin" not in bright.text
    assert body["message"]
    # The log keeps what the operator needs: which request failed (the x-request-id the client got) and why.
    request_id = bright.headers["x-request-id"]
    line = wait_for_log_line(ops_server, rf"forward pass failed for requests .*{request_id}")
    assert "RuntimeError: cannot read /srv/segserve/secret/cache.bin" in line
    # And the worker survived: the next request is answered.
    assert requests.post(url, data=encode_image(Image.new("RGB", (5, 5))), headers=headers,
                         timeout=60).status_code == 200


@pytest.mark.integration
@pytest.mark.parametrize("case", ["not_an_image", "empty", "bad_option", "too_many_pixels", "bad_json",
                                  "form_urlencoded", "unknown_model", "unknown_version", "wrong_method"])
def test_error_bodies_carry_no_traceback_or_path(server, case):
    predict = f"{server.inference_url}/predictions/{MODEL}"
    octet = {**server.headers(), "Content-Type": "application/octet-stream"}
    huge = Image.new("1", (8000, 6000))  # 48 Mpx: over max_pixels, a small file
    call = {
        "not_an_image": lambda: requests.post(predict, data=b"\x89PNG\r\n\x1a\n" + b"\0" * 40, headers=octet),
        "empty": lambda: requests.post(predict, data=b"", headers=octet),
        "bad_option": lambda: requests.post(predict, headers=server.headers(), data={"format": "bmp"},
                                            files={"data": ("x.png", encode_image(random_image(4, 4)))}),
        "too_many_pixels": lambda: requests.post(predict, data=encode_image(huge), headers=octet),
        "bad_json": lambda: requests.post(predict, data=b'{"image": ', headers={**server.headers(),
                                                                                "Content-Type": "application/json"}),
        # curl --data-binary without a Content-Type: TorchServe's own form decoder fails (its 500).
        "form_urlencoded": lambda: requests.post(predict, data=b"%%%\x89PNG=&&\xff", headers={
            **server.headers(), "Content-Type": "application/x-www-form-urlencoded"}),
        "unknown_model": lambda: requests.post(f"{server.inference_url}/predictions/nope", data=b"x",
                                               headers=octet),
        "unknown_version": lambda: requests.post(f"{predict}/9.9", data=b"x", headers=octet),
        "wrong_method": lambda: requests.delete(predict, headers=server.headers()),
    }[case]
    assert_clean(call())
