"""The Python client and the `segserve` CLI: tokens, retries, many images, end to end against TorchServe."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
from conftest import encode_image
from PIL import Image

from segserve.cli import main
from segserve.client import SegservClient, SegservError, read_key
from segserve.synthetic import generate_scene


def test_token_resolution_order(tmp_path, monkeypatch):
    keys = tmp_path / "key_file.json"
    keys.write_text(json.dumps({"inference": {"key": "from-file"}, "management": {"key": "m-file"}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEGSERVE_TOKEN", raising=False)
    monkeypatch.delenv("SEGSERVE_KEY_FILE", raising=False)
    assert SegservClient().token == "from-file"  # ./key_file.json
    monkeypatch.setenv("SEGSERVE_TOKEN", "from-env")
    assert SegservClient().token == "from-env"
    assert SegservClient(token="explicit").token == "explicit"
    assert read_key("management", keys) == "m-file"
    with pytest.raises(FileNotFoundError, match="key file not found"):
        read_key("inference", tmp_path / "nope.json")


class Flaky(BaseHTTPRequestHandler):
    """Answers 503 to the first `failures` requests, then 200 with a tiny PNG."""

    failures = 2
    calls = 0

    def do_POST(self):  # noqa: N802 - http.server's naming
        type(self).calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).calls <= type(self).failures:
            body = b'{"code": 503, "type": "ServiceUnavailable", "message": "busy"}'
            status, ctype = 503, "application/json"
        else:
            body, status, ctype = encode_image(Image.new("P", (3, 2))), 200, "image/png"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def flaky_server():
    Flaky.calls = 0
    httpd = HTTPServer(("127.0.0.1", 0), Flaky)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def test_retries_on_503_then_succeeds(flaky_server):
    client = SegservClient(flaky_server, token="t", retries=3, backoff=0.01)
    prediction = client.predict(b"\x89PNG", format="png")
    assert Flaky.calls == 3 and prediction.mask().shape == (2, 3)


def test_gives_up_after_retries_with_the_server_message(flaky_server):
    Flaky.failures = 10
    try:
        client = SegservClient(flaky_server, token="t", retries=1, backoff=0.01)
        with pytest.raises(SegservError) as info:
            client.predict(b"x")
        assert info.value.status == 503 and "busy" in info.value.message and Flaky.calls == 2
    finally:
        Flaky.failures = 2


def test_connection_refused_is_a_clear_error():
    client = SegservClient("http://127.0.0.1:9", token="t", retries=1, backoff=0.01)
    with pytest.raises(SegservError, match="cannot reach"):
        client.predict(b"x")


@pytest.fixture()
def client(server):
    return SegservClient(server.inference_url, key_file=server.workdir / "key_file.json",
                         management_url=server.management_url)


@pytest.mark.integration
def test_predict_json_and_png(client):
    image, _ = generate_scene(81, (201, 333))
    as_png = client.predict(Image.fromarray(image), format="png")
    as_json = client.predict(Image.fromarray(image))
    assert as_png.mask().shape == (201, 333)
    assert np.array_equal(as_png.mask(), as_json.mask())
    assert as_json.json()["width"] == 333


@pytest.mark.integration
def test_bad_input_raises_with_status(client):
    with pytest.raises(SegservError) as info:
        client.predict(b"definitely not an image")
    assert info.value.status == 400 and info.value.type == "invalid_image"


@pytest.mark.integration
def test_predict_many_keeps_order_and_isolates_failures(client, tmp_path):
    paths = []
    for i in range(5):
        path = tmp_path / f"scene{i}.png"
        Image.fromarray(generate_scene(90 + i, (128, 160))[0]).save(path)
        paths.append(path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    results = client.predict_many(paths[:2] + [bad] + paths[2:], workers=3, progress=False, format="png")
    assert isinstance(results[2], SegservError) and results[2].status == 400
    assert all(r.mask().shape == (128, 160) for i, r in enumerate(results) if i != 2)


@pytest.mark.integration
def test_health_reports_ready_workers(client):
    report = client.health()
    assert report["healthy"] and report["ping"]["status"] == "Healthy"
    assert any(w["status"] == "READY" for w in report["workers"])


@pytest.mark.integration
def test_cli_predict_and_health_end_to_end(server, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, size in enumerate([(100, 140), (77, 51)]):
        Image.fromarray(generate_scene(95 + i, size)[0]).save(inputs / f"img{i}.png")
    common = ["--url", server.inference_url, "--key-file", str(server.workdir / "key_file.json")]
    out = tmp_path / "out"
    assert main(["predict", str(inputs), "--format", "png", "--out", str(out), "--no-progress", *common]) == 0
    assert Image.open(out / "img0.png").size == (140, 100)
    assert Image.open(out / "img1.png").size == (51, 77)
    assert main(["predict", str(inputs / "img1.png"), "--format", "rle", "--out", str(out), "--no-progress",
                 *common]) == 0
    assert json.loads((out / "img1.json").read_text())["classes"][0]["rle"]
    assert main(["health", *common]) == 0
    capsys.readouterr()
    assert main(["predict", str(inputs / "img0.png"), "--out", str(out), "--no-progress", "--url",
                 server.inference_url, "--token", "wrong", "--retries", "0"]) == 1
    assert "Token" in capsys.readouterr().err
