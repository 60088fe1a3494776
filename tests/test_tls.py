"""Optional TLS (docs/operations.md): a self-signed certificate made here with the openssl CLI, TorchServe
serving all three HTTP APIs over HTTPS, and clients that verify the certificate."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import requests
from support import MODEL, REPO, encode_image, random_image, torchserve

from segserve.tools.server import ServerError, TorchServe, tls_from_env

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def self_signed(directory) -> tuple:
    """cert.pem and key.pem (PKCS#8, unencrypted) for 127.0.0.1 and localhost, valid one day."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, model_store):
    root = tmp_path_factory.mktemp("tls")
    with torchserve(root, model_store, [f"{MODEL}={MODEL}.mar"], [MODEL], tls=self_signed(root)) as ts:
        yield ts  # ready over HTTPS, verified


@pytest.mark.integration
def test_config_names_the_certificate_and_https_addresses(tls_server):
    text = (tls_server.workdir / "config.properties").read_text()
    for key in ("inference_address", "management_address", "metrics_address"):
        assert f"{key}=https://127.0.0.1:" in text
    assert "certificate_file=" in text and "private_key_file=" in text


@pytest.mark.integration
def test_all_three_apis_answer_over_verified_https(tls_server):
    verify = tls_server.verify
    ping = requests.get(f"{tls_server.inference_url}/ping", headers=tls_server.headers(), verify=verify, timeout=30)
    assert ping.json()["status"] == "Healthy"
    response = requests.post(f"{tls_server.inference_url}/predictions/{MODEL}", data=encode_image(random_image(30, 20)),
                             headers={**tls_server.headers(), "Accept": "image/png"}, verify=verify, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    models = requests.get(f"{tls_server.management_url}/models", headers=tls_server.headers("management"),
                          verify=verify, timeout=30)
    assert [m["modelName"] for m in models.json()["models"]] == [MODEL]
    assert "ts_inference_requests_total" in requests.get(f"{tls_server.metrics_url}/metrics", verify=verify,
                                                         timeout=30).text


@pytest.mark.integration
def test_the_certificate_is_checked_and_plain_http_is_refused(tls_server):
    url = f"{tls_server.inference_url}/ping"
    with pytest.raises(requests.exceptions.SSLError):  # the system's CAs do not know a self-signed certificate
        requests.get(url, headers=tls_server.headers(), timeout=30)
    # Plain HTTP on the same port: a 403 and nothing else (the key sent in clear is still exposed: use https).
    plain = requests.get(url.replace("https://", "http://"), headers=tls_server.headers(), timeout=30)
    assert plain.status_code == 403 and "only accepts HTTPS" in plain.json()["status"]


@pytest.mark.integration
def test_segserve_client_and_curl_with_the_certificate(tls_server):
    # requests (and so segserve's client and CLI) trust a CA file named by REQUESTS_CA_BUNDLE.
    env = dict(os.environ, REQUESTS_CA_BUNDLE=tls_server.verify, SEGSERVE_URL=tls_server.inference_url,
               SEGSERVE_TOKEN=tls_server.keys()["inference"], PYTHONPATH=str(REPO / "src"))  # this checkout's client
    code = ("from segserve.client import SegservClient; from PIL import Image; "
            "print(SegservClient().predict(Image.new('RGB', (12, 9)), format='png').mask().shape)")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "(9, 12)" in result.stdout, result.stderr[-2000:]
    if shutil.which("curl"):
        curl = subprocess.run(["curl", "-s", "--cacert", tls_server.verify, "-H",
                               f"Authorization: Bearer {tls_server.keys()['inference']}",
                               f"{tls_server.inference_url}/ping"], capture_output=True, text=True, timeout=60)
        assert '"Healthy"' in curl.stdout, curl.stderr


def test_make_serve_takes_the_certificate_from_the_environment(tmp_path, monkeypatch):
    cert, key = self_signed(tmp_path)
    for name in ("SEGSERVE_TLS_CERT", "SEGSERVE_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert tls_from_env() is None
    monkeypatch.setenv("SEGSERVE_TLS_CERT", str(cert))
    with pytest.raises(ServerError, match="both"):
        tls_from_env()
    monkeypatch.setenv("SEGSERVE_TLS_KEY", str(tmp_path / "missing.pem"))
    with pytest.raises(ServerError, match="missing.pem not found"):
        tls_from_env()
    monkeypatch.setenv("SEGSERVE_TLS_KEY", str(key))
    ts = TorchServe(workdir=tmp_path / "run", model_store=tmp_path, base_config=REPO / "config.properties",
                    ports={"inference": 1, "management": 2, "metrics": 3}, tls=tls_from_env())
    assert ts.inference_url == "https://127.0.0.1:1" and ts.metrics_url == "https://127.0.0.1:3"
    (tmp_path / "run").mkdir()
    text = ts.write_config().read_text()
    assert f"certificate_file={cert}" in text and f"private_key_file={key}" in text
