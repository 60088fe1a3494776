"""`segserve ui`: the try-it page and its loopback server.

Unit tests drive the page's server against a small recording upstream. The integration tests use the real
TorchServe: the CORS facts that decide the design (its headers for the page's origin; its token check refusing
the browser's preflight), then the page itself in a real headless browser (Debian's chromium and chromedriver
through Selenium), relayed (token auth on) and direct (a TorchServe with token auth off and CORS for the page):
pick docs/sample-input.png, read the per-class table, download the mask. Without chromium they skip, saying so.

SEGSERVE_UI_SCREENSHOT=docs/ui.png writes the README's screenshot from the relayed run.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import time

import numpy as np
import pytest
import requests
from PIL import Image
from support import MODEL, REPO
from support.http_fakes import Answering, loopback, serving

from segserve.client import SegservClient
from segserve.client.cli import parser
from segserve.client.ui import PAGE, make_server
from segserve.tools import torchserve_config
from segserve.tools.server import TorchServe, free_ports

SAMPLE = REPO / "docs" / "sample-input.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


class Upstream(Answering):
    """Records each request; answers 200 with a body naming what it got."""

    seen: list[dict] = []

    def _answer(self, body: bytes | None):
        type(self).seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                "body": body})
        self.send_json(200, {"got": self.path})

    def do_POST(self):  # noqa: N802 - http.server's naming
        self._answer(self.read_body())

    def do_GET(self):  # noqa: N802
        self._answer(None)


@pytest.fixture()
def page(tmp_path, monkeypatch):
    """The page's server (port 0) relaying to the recording upstream, its key from a key file."""
    for name in ("SEGSERVE_URL", "SEGSERVE_TOKEN", "SEGSERVE_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    Upstream.seen = []
    keys = tmp_path / "key_file.json"
    keys.write_text(json.dumps({"inference": {"key": "first"}, "management": {"key": "m"}}))
    with serving(loopback(Upstream)) as upstream_url:
        server = make_server(SegservClient(upstream_url, key_file=keys), port=0, key_file=str(keys), quiet=True)
        with serving(server):
            yield server, keys


def test_the_page_and_its_settings_are_served(page):
    server, _ = page
    for path, media in (("/", "text/html"), ("/app.js", "text/javascript"), ("/style.css", "text/css")):
        answer = requests.get(server.origin + path, timeout=10)
        assert answer.status_code == 200 and answer.headers["Content-Type"].startswith(media)
    assert requests.get(server.origin + "/", timeout=10).content == (PAGE / "index.html").read_bytes()
    config = requests.get(server.origin + "/config.json", timeout=10).json()
    assert config["predict_url"] == "/predictions/segmenter" and config["mode"] == "relay"
    assert "first" not in json.dumps(config)  # the key stays in this process
    assert requests.get(server.origin + "/etc/passwd", timeout=10).status_code == 404


def test_the_relay_adds_the_current_key_and_passes_the_body_as_it_came(page):
    server, keys = page
    form = {"data": ("x.png", b"\x89PNG...", "image/png")}
    answer = requests.post(server.origin + "/predictions/segmenter", files=form, data={"format": "png"}, timeout=10)
    assert answer.json() == {"got": "/predictions/segmenter"}
    (sent,) = Upstream.seen
    assert sent["headers"]["Authorization"] == "Bearer first"
    assert sent["headers"]["Content-Type"].startswith("multipart/form-data; boundary=")
    assert b'name="format"' in sent["body"] and b"\x89PNG..." in sent["body"]
    keys.write_text(json.dumps({"inference": {"key": "second"}}))  # TorchServe restarted: new keys
    requests.get(server.origin + "/ping", timeout=10)
    assert Upstream.seen[-1]["headers"]["Authorization"] == "Bearer second"
    assert requests.post(server.origin + "/models", data=b"x", timeout=10).status_code == 404  # predictions only


def test_other_sites_cannot_use_the_relay(page):
    server, _ = page
    port = server.server_port
    evil = requests.post(server.origin + "/predictions/segmenter", data=b"x", timeout=10,
                         headers={"Origin": "https://evil.example", "Content-Type": "image/png"})
    assert evil.status_code == 403 and "not this page's" in evil.json()["message"]
    other_port = requests.post(server.origin + "/predictions/segmenter", data=b"x", timeout=10,
                               headers={"Origin": f"http://127.0.0.1:{port + 1}"})
    assert other_port.status_code == 403
    rebound = requests.get(server.origin + "/config.json", headers={"Host": f"attacker.example:{port}"}, timeout=10)
    assert rebound.status_code == 403
    assert Upstream.seen == []
    same = requests.get(server.origin + "/ping", headers={"Origin": f"http://localhost:{port}"}, timeout=10)
    assert same.status_code == 200


def test_an_unreachable_torchserve_is_a_clear_error(tmp_path):
    client = SegservClient(f"http://127.0.0.1:{free_ports('x')['x']}", token="t", retries=0)
    server = make_server(client, port=0, quiet=True)
    with serving(server):
        answer = requests.post(server.origin + "/predictions/segmenter", data=b"x", timeout=30)
    assert answer.status_code == 502 and "is TorchServe running" in answer.json()["message"]


def test_the_default_port_is_the_origin_make_serve_allows():
    args = parser().parse_args(["ui"])
    assert (args.host, args.port) == ("127.0.0.1", 8090)
    assert torchserve_config.UI_ORIGIN == f"http://{args.host}:{args.port}"


# -- integration: the real TorchServe, a real browser ----------------------------------------------------------
@pytest.mark.integration
def test_torchserve_sends_cors_headers_for_the_page_but_refuses_its_preflight(server):
    """Why the page is relayed when token auth is on: the browser's preflight carries no token and TorchServe's
    token check answers it 400, which the browser takes as a refusal."""
    key = server.keys()["inference"]
    answer = requests.post(f"{server.inference_url}/predictions/{MODEL}", headers={"Authorization": f"Bearer {key}"},
                           files={"data": ("x.png", SAMPLE.read_bytes(), "image/png")}, timeout=120)
    assert answer.status_code == 200
    assert answer.headers["Access-Control-Allow-Origin"] == torchserve_config.UI_ORIGIN
    preflight = requests.options(f"{server.inference_url}/predictions/{MODEL}", timeout=30,
                                 headers={"Origin": torchserve_config.UI_ORIGIN,
                                          "Access-Control-Request-Method": "POST",
                                          "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 400 and preflight.json()["type"] == "InvalidKeyException"


def _browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium / chromedriver on the PATH (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra (pip install -e .[dev])")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1180,640"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _pick_and_wait(driver, path) -> None:
    """Pick `path` in the file input and wait until the page says it is done or failed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    driver.execute_script("document.getElementById('status').textContent = ''")
    driver.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(driver, 240).until(lambda d: d.find_element(By.ID, "status").text and not (
        d.find_element(By.ID, "status").text.startswith("segmenting")))


def _table(driver) -> list[tuple[int, str, int]]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#classes-table tbody tr")
    return [(int(cells[0].text), cells[1].text, int(cells[2].text)) for cells in
            (row.find_elements(By.TAG_NAME, "td") for row in rows)]


def _download(driver) -> tuple[str, bytes]:
    """The download link's file name and the bytes behind its blob URL, read in the page."""
    from selenium.webdriver.common.by import By

    link = driver.find_element(By.ID, "download")
    data = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => {"
        "  let s = ''; new Uint8Array(b).forEach(c => s += String.fromCharCode(c)); done(btoa(s)); });",
        link.get_attribute("href"))
    return link.get_attribute("download"), base64.b64decode(data)


def _check_the_page(driver, origin: str, client: SegservClient, tmp_path, screenshot: str | None = None) -> None:
    from selenium.webdriver.common.by import By

    driver.get(origin + "/")
    _pick_and_wait(driver, SAMPLE)
    assert driver.find_element(By.ID, "status").text == "done: sample-input.png"
    expected = client.predict(SAMPLE).json()["classes"]
    assert _table(driver) == [(c["id"], c["name"], c["pixels"]) for c in expected]
    overlay = driver.find_element(By.ID, "overlay")
    assert driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", overlay) == [
        512, 384]
    name, body = _download(driver)
    assert name == "sample-input.png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(body))), client.predict(SAMPLE, format="png").mask())
    if screenshot:  # the README's picture: a palette PNG, small enough to commit
        shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        shot.quantize(96, dither=Image.Dither.NONE).save(screenshot, optimize=True)
    # Another format: the table stays, the download is that format's answer.
    from selenium.webdriver.support.ui import Select, WebDriverWait

    Select(driver.find_element(By.ID, "format")).select_by_value("rle")
    WebDriverWait(driver, 240).until(lambda d: d.find_element(By.ID, "download").get_attribute("download")
                                     == "sample-input.json")
    name, body = _download(driver)
    assert json.loads(body)["mask_format"] == "coco_rle"
    # What the server refuses is shown with its message.
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    _pick_and_wait(driver, broken)
    status = driver.find_element(By.ID, "status")
    assert status.text.startswith("400 invalid_image:") and "error" in status.get_attribute("class")


@pytest.mark.integration
def test_the_page_relayed_to_torchserve_with_token_auth(server, tmp_path):
    driver = _browser()
    client = SegservClient(server.inference_url, key_file=server.workdir / "key_file.json")
    page = make_server(client, port=0, key_file=str(server.workdir / "key_file.json"), quiet=True)
    with serving(page):
        try:
            _check_the_page(driver, page.origin, client, tmp_path, os.environ.get("SEGSERVE_UI_SCREENSHOT"))
        finally:
            driver.quit()


@pytest.fixture(scope="module")
def open_server(tmp_path_factory, model_store):
    """A TorchServe with token auth off and CORS for one page origin: what `segserve ui --direct` needs."""
    ports = free_ports("inference", "management", "metrics", "grpc_inference", "grpc_management", "page")
    page_port = ports.pop("page")
    root = tmp_path_factory.mktemp("open")
    ts = TorchServe(workdir=root / "run", model_store=model_store, base_config=REPO / "config.properties",
                    ports=ports, models=(f"{MODEL}={MODEL}.mar",),
                    extra_properties=(("disable_token_authorization", "true"),
                                      ("cors_allowed_origin", f"http://127.0.0.1:{page_port}")))
    ts.start()
    try:
        _wait_ready_without_token(ts)
        yield ts, page_port
    finally:
        ts.stop()


def _wait_ready_without_token(ts: TorchServe, timeout: float = 240) -> None:
    """TorchServe.wait_ready reads the key file, which TorchServe does not write with token auth off."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            described = requests.get(f"{ts.management_url}/models/{MODEL}", timeout=5)
            if described.ok and any(w["status"] == "READY" for w in described.json()[0]["workers"]):
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no READY worker within {timeout:.0f}s; see {ts.log_dir}")


@pytest.mark.integration
def test_the_page_direct_to_torchserve_through_cors(open_server, tmp_path):
    driver = _browser()
    ts, page_port = open_server
    client = SegservClient(ts.inference_url, token=None, key_file=None)
    page = make_server(client, port=page_port, direct=True, quiet=True)
    with serving(page):
        try:
            assert requests.get(page.origin + "/config.json", timeout=10).json()["predict_url"] == (
                f"{ts.inference_url}/predictions/{MODEL}")
            _check_the_page(driver, page.origin, client, tmp_path)
        finally:
            driver.quit()
