"""The Python client and the `segserve` CLI: tokens, retries, errors, many images, end to end against TorchServe.

Unit tests use a scripted fake session or a tiny local HTTP server; the `integration` ones use the real
TorchServe from conftest's session fixture.
"""

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image
from support import encode_image
from support.http_fakes import Answering, form_fields, loopback, serving

from segserve.client import (
    FormatError,
    InputError,
    InputTypeError,
    KeyFileError,
    Prediction,
    SegservClient,
    SegservError,
    ServerRefused,
    Unreachable,
    read_key,
    resolve_token,
)
from segserve.client import api as client_module
from segserve.client.cli import main
from segserve.tools.synthetic import generate_scene

INVALID_KEY = {"code": 400, "type": "InvalidKeyException",
               "message": "Token Authorization failed. Token either incorrect, expired, or not provided correctly"}


def png_bytes(width: int, height: int) -> bytes:
    return encode_image(Image.new("P", (width, height)))


def response(status: int, body: bytes | dict | list = b"", content_type: str = "application/json") -> requests.Response:
    r = requests.Response()
    r.status_code = status
    r._content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r.headers["Content-Type"] = content_type
    r.reason = "scripted"
    return r


class FakeSession:
    """Answers from a script: each item is a Response to return or an exception to raise; records the calls."""

    def __init__(self, *script):
        self.script, self.calls = list(script), []

    def request(self, method, url, headers=None, timeout=None, **kwargs):
        self.calls.append({"method": method, "url": url, "headers": headers or {}, **kwargs})
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, Exception):
            raise item
        return item


@pytest.fixture()
def no_env(monkeypatch, tmp_path):
    """A scratch cwd and no SEGSERVE_* variables, so the developer's own run/key_file.json cannot leak in."""
    for name in ("SEGSERVE_URL", "SEGSERVE_TOKEN", "SEGSERVE_MANAGEMENT_TOKEN", "SEGSERVE_KEY_FILE",
                 "SEGSERVE_MANAGEMENT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture()
def sleeps(monkeypatch):
    """Record backoff delays instead of sleeping them."""
    delays = []
    monkeypatch.setattr(client_module.time, "sleep", delays.append)
    return delays


def write_keys(path, inference, management="m"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"inference": {"key": inference}, "management": {"key": management},
                                "API": {"key": "api"}}))
    return path


# -- tokens ---------------------------------------------------------------------------------------------
def test_token_resolution_order(no_env, monkeypatch):
    write_keys(no_env / "key_file.json", "cwd", "m-cwd")
    assert SegservClient().token == "cwd"
    write_keys(no_env / "run" / "key_file.json", "run", "m-run")
    assert (SegservClient().token, SegservClient().management_token) == ("run", "m-run")
    monkeypatch.setenv("SEGSERVE_KEY_FILE", str(write_keys(no_env / "env.json", "env-file")))
    assert SegservClient().token == "env-file"
    assert SegservClient(key_file=write_keys(no_env / "arg.json", "arg-file")).token == "arg-file"
    monkeypatch.setenv("SEGSERVE_TOKEN", "env-token")
    monkeypatch.setenv("SEGSERVE_MANAGEMENT_TOKEN", "env-m")
    assert SegservClient(key_file=no_env / "arg.json").token == "env-token"
    assert SegservClient().management_token == "env-m"
    assert SegservClient(token="explicit").token == "explicit"
    assert resolve_token("inference", "explicit")[1] == "the token argument (--token)"


def test_named_key_file_must_exist_and_be_a_key_file(no_env, monkeypatch):
    with pytest.raises(KeyFileError, match="nope.json"):
        read_key("inference", no_env / "nope.json")
    monkeypatch.setenv("SEGSERVE_KEY_FILE", str(no_env / "missing.json"))
    with pytest.raises(KeyFileError, match="SEGSERVE_KEY_FILE"):
        SegservClient()
    (no_env / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a TorchServe key file"):
        read_key("inference", no_env / "bad.json")


def test_no_token_sends_no_header_and_the_error_says_where_it_looked(no_env):
    session = FakeSession(response(400, INVALID_KEY))
    client = SegservClient(session=session)
    assert client.token is None
    with pytest.raises(SegservError) as info:
        client.predict(b"x")
    assert "Authorization" not in session.calls[0]["headers"]
    assert info.value.status == 400 and info.value.type == "InvalidKeyException"
    assert "$SEGSERVE_TOKEN" in info.value.message and "run/key_file.json" in info.value.message


def test_wrong_token_error_names_its_source(no_env):
    write_keys(no_env / "run" / "key_file.json", "stale")
    client = SegservClient(session=FakeSession(response(401, INVALID_KEY)))
    with pytest.raises(SegservError, match=r"refused the inference token from run/key_file.json") as info:
        client.predict(b"x")
    assert info.value.status == 401


def test_management_url_defaults_only_for_torchserve_default_port(no_env):
    assert SegservClient("http://h:8080/").management_url == "http://h:8081"
    assert SegservClient("http://h:9000").management_url is None
    assert SegservClient("http://h:9000", management_url="http://h:9001/").management_url == "http://h:9001"


# -- retries and errors ---------------------------------------------------------------------------------
def test_retries_503_507_and_connection_errors_with_growing_jittered_backoff(no_env, sleeps):
    ok = response(200, png_bytes(3, 2), "image/png")
    session = FakeSession(response(503, b"busy", "text/plain"), response(507, {"code": 507}),
                          requests.ConnectionError("refused"), requests.Timeout("slow"), ok)
    client = SegservClient(token="t", retries=4, backoff=1.0, session=session)
    assert client.predict(b"img", format="png").mask().shape == (2, 3)
    assert len(session.calls) == 5
    for attempt, delay in enumerate(sleeps):
        assert 0.5 * 2 ** attempt <= delay <= 1.5 * 2 ** attempt


@pytest.mark.parametrize("status", [500, 507])
def test_retries_a_prediction_whose_worker_died(no_env, sleeps, status):
    # What TorchServe 0.12 answers for the batch in flight on a worker killed with -9 (tests/test_soak.py).
    died = {"code": status, "type": "InternalServerException", "message": "Worker died."}
    session = FakeSession(response(status, died), response(200, png_bytes(2, 2), "image/png"))
    assert SegservClient(token="t", session=session).predict(b"x", format="png").mask().shape == (2, 2)
    assert len(session.calls) == 2 and len(sleeps) == 1


@pytest.mark.parametrize("status", [400, 404, 413, 500])
def test_other_errors_are_not_retried_and_carry_the_server_message(no_env, sleeps, status):
    body = {"code": status, "type": "invalid_image", "message": "cannot decode the image"}
    session = FakeSession(response(status, body), response(200, png_bytes(1, 1), "image/png"))
    with pytest.raises(SegservError) as info:
        SegservClient(token="t", session=session).predict(b"x")
    assert (info.value.status, info.value.type, info.value.message) == (status, "invalid_image",
                                                                        "cannot decode the image")
    assert len(session.calls) == 1 and sleeps == []


def test_gives_up_after_retries_and_parses_non_json_errors(no_env, sleeps):
    session = FakeSession(response(503, b"Service Unavailable: queue full", "text/plain"))
    with pytest.raises(SegservError, match="queue full") as info:
        SegservClient(token="t", retries=2, session=session).predict(b"x")
    assert info.value.status == 503 and info.value.type == "http_error"
    assert len(session.calls) == 3 and len(sleeps) == 2


def test_unreachable_server_is_a_clear_error(no_env, sleeps):
    session = FakeSession(requests.ConnectionError("refused"))
    with pytest.raises(SegservError, match=r"cannot reach http://127.0.0.1:1 .*3 attempts.*--url") as info:
        SegservClient("http://127.0.0.1:1", token="t", retries=2, session=session).predict(b"x")
    assert info.value.status == 0 and len(session.calls) == 3 and isinstance(info.value, Unreachable)


def test_request_is_multipart_with_options_as_form_fields(no_env, tmp_path):
    path = tmp_path / "cells.jpg"
    path.write_bytes(b"jpeg bytes")
    session = FakeSession(response(200, {"ok": True}))
    SegservClient("http://h:1", model="m", version="2.0", token="t", session=session).predict(
        path, format="rle", classes=["cell", 2], min_area=5)
    call = session.calls[0]
    assert call["method"] == "POST" and call["url"] == "http://h:1/predictions/m/2.0" and "params" not in call
    assert call["headers"] == {"Authorization": "Bearer t"}
    assert call["files"] == {"data": ("cells.jpg", b"jpeg bytes", "image/jpeg")}
    assert call["data"] == {"format": "rle", "classes": "cell,2", "min_area": "5"}
    SegservClient(token="t", session=session).predict(path, format="png", tile="on")
    assert session.calls[-1]["data"] == {"format": "png", "tile": "on"}
    SegservClient(token="t", session=session).predict(Image.new("RGB", (4, 3)))
    name, data, media = session.calls[2]["files"]["data"]
    assert media == "image/png" and Image.open(io.BytesIO(data)).size == (4, 3)


def test_prediction_helpers(tmp_path):
    mask = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8), "L").convert("P")
    png = encode_image(mask)
    as_json = Prediction(200, "application/json", json.dumps({"mask": base64.b64encode(png).decode()}).encode())
    as_png = Prediction(200, "image/png", png)
    assert np.array_equal(as_json.mask(), as_png.mask()) and as_png.mask().dtype == np.uint8
    assert as_png.mask().tolist() == [[0, 1], [2, 1]]
    assert [Prediction(200, t, b"").extension for t in ("application/json; charset=utf-8", "image/jpeg",
                                                         "application/x-npy", "text/x")] == [".json", ".jpg",
                                                                                              ".npy", ".bin"]
    assert as_png.save(tmp_path / "m.png").read_bytes() == png
    with pytest.raises(FormatError, match="format='png'"):
        Prediction(200, "image/jpeg", b"").mask()


def test_predict_many_keeps_order_and_puts_each_failure_in_its_slot(no_env, tmp_path):
    class Slow(FakeSession):
        def request(self, method, url, **kwargs):
            name = kwargs["files"]["data"][0]
            time.sleep(0.05 if name == "a.png" else 0)  # finishes last: results must still be in input order
            if name == "bad.png":
                return response(400, {"code": 400, "type": "invalid_image", "message": "not an image"})
            size = {"a.png": 1, "b.png": 2, "c.png": 3}[name]
            return response(200, png_bytes(size, size), "image/png")

    paths = []
    for name in ("a.png", "b.png", "bad.png", "c.png"):
        paths.append(tmp_path / name)
        paths[-1].write_bytes(b"...")
    paths.insert(3, tmp_path / "missing.png")
    results = list(SegservClient(token="t", session=Slow()).predict_many(paths, workers=3, progress=False,
                                                                          format="png", ordered=True))
    assert [r.mask().shape[0] if isinstance(r, Prediction) else r.type for r in results] == [
        1, 2, "invalid_image", "unreadable_file", 3]
    assert [r.index for r in results] == [0, 1, 2, 3, 4] and [r.source for r in results] == paths
    assert isinstance(results[2], ServerRefused) and isinstance(results[3], InputError)


def test_predict_many_stops_sending_once_the_server_refuses_an_option(no_env):
    refusal = {"code": 400, "type": "invalid_option", "message": "format='gif' is not supported; use one of: png"}
    session = FakeSession(response(400, refusal))
    results = list(SegservClient(token="t", session=session).predict_many([b"img"] * 6, workers=2, progress=False,
                                                                          format="gif"))
    assert len(session.calls) == 2  # the two in flight; the other four would be refused the same way
    assert [(r.status, r.type, r.message) for r in results] == [(400, "invalid_option", refusal["message"])] * 6
    assert sorted(r.index for r in results) == list(range(6))


def test_health_needs_ping_and_a_ready_worker(no_env):
    ping = response(200, {"status": "Healthy"})
    described = response(200, [{"modelName": "segmenter", "workers": [{"id": "9000", "status": "UNLOADING"}]}])
    session = FakeSession(ping, described)
    report = SegservClient("http://h:8080", token="t", management_token="m", session=session).health()
    assert [c["url"] for c in session.calls] == ["http://h:8080/ping", "http://h:8081/models/segmenter"]
    assert session.calls[1]["headers"] == {"Authorization": "Bearer m"}
    assert report["ping"] == {"status": "Healthy"} and report["workers"][0]["status"] == "UNLOADING"
    assert not report["healthy"]
    # No management key: the ping alone decides, and the management API is not called.
    session = FakeSession(ping)
    assert SegservClient("http://h:8080", token="t", session=session).health()["healthy"]
    assert len(session.calls) == 1
    refused = SegservClient(token="t", session=FakeSession(response(400, INVALID_KEY))).health()
    assert not refused["healthy"] and "refused the inference token" in refused["error"]


def palette_image(labels: np.ndarray, palette: list[int] | None = None) -> Image.Image:
    image = Image.frombytes("P", labels.shape[::-1], labels.tobytes())
    image.putpalette(palette or [v for i in range(256) for v in (i, i, i)])  # distinct: PNG keeps every index
    return image


def _sent_image(call) -> np.ndarray:
    name, data, media = call["files"]["data"]
    assert (name, media) == ("image.png", "image/png")
    return np.asarray(Image.open(io.BytesIO(data)))


def test_numpy_and_pil_images_are_sent_as_lossless_png(no_env):
    session = FakeSession(response(200, {"ok": True}))
    client = SegservClient(token="t", session=session)
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    gray = rgb[..., 0].copy()
    deep = (gray.astype(np.uint16) * 257)
    for image, expected in ((rgb, rgb), (gray, gray), (gray[..., None], gray), (deep, deep),
                            (Image.fromarray(rgb), rgb), (rgb[:, ::-1], rgb[:, ::-1])):
        client.predict(image)
        assert np.array_equal(_sent_image(session.calls[-1]), expected)


@pytest.mark.parametrize("image, kind, message", [
    (np.zeros((4, 4), np.float32), InputError, "float32 array of shape (4, 4)"),
    (np.zeros((4, 4, 2), np.uint8), InputError, "(H, W, 3) uint8"),
    (np.zeros(4, np.uint8), InputError, "shape (4,)"),
    (42, InputTypeError, "cannot send a int: pass a path, image bytes, a numpy array"),
    ([[0, 1]], InputTypeError, "cannot send a list"),
])
def test_an_image_the_client_cannot_send_is_a_clear_error(no_env, image, kind, message):
    session = FakeSession(response(200, {"ok": True}))
    with pytest.raises(kind) as info:
        SegservClient(token="t", session=session).predict(image)
    assert message in info.value.message and isinstance(info.value, SegservError) and session.calls == []
    if kind is InputTypeError:
        assert isinstance(info.value, TypeError)  # `except TypeError` still catches it
    else:
        assert isinstance(info.value, ValueError)


def test_predict_many_captures_every_per_image_error(no_env, tmp_path):
    ok = response(200, png_bytes(2, 2), "image/png")
    images = [b"img", 42, np.zeros((2, 2), np.float64), tmp_path / "missing.png", Image.new("RGB", (2, 2))]
    results = list(SegservClient(token="t", session=FakeSession(ok)).predict_many(images, progress=False,
                                                                                   ordered=True))
    assert [type(r).__name__ for r in results] == ["Prediction", "InputTypeError", "InputError", "InputError",
                                                   "Prediction"]
    assert [r.type for r in results[1:4]] == ["unsupported_input", "unsupported_array", "unreadable_file"]
    assert [r.index for r in results] == list(range(5)) and results[1].source == 42


class Gate(FakeSession):
    """Answers PNGs; counts requests in flight and their peak; image b"slow" waits until `release` is set."""

    def __init__(self):
        super().__init__(response(200, png_bytes(1, 1), "image/png"))
        self.lock, self.now, self.peak, self.release = threading.Lock(), 0, 0, threading.Event()
        self.slow_done = threading.Event()
        self.release_after = 30.0  # a safety net: tests set `release`, or lower this to let the slow one finish

    def request(self, method, url, headers=None, timeout=None, **kwargs):
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            if kwargs["files"]["data"][1] == b"slow":
                self.release.wait(self.release_after)
                self.slow_done.set()
            return super().request(method, url, headers, timeout, **kwargs)
        finally:
            with self.lock:
                self.now -= 1


def test_predict_many_yields_as_results_finish_with_bounded_reads_and_requests(no_env):
    session = Gate()
    pulled = []

    def images():
        for i in range(1000):
            pulled.append(i)
            yield b"slow" if i == 0 else b"fast"

    results = SegservClient(token="t", session=session).predict_many(images(), workers=3, progress=False)
    first = next(results)
    assert first.index != 0  # the slow first image does not hold back those that finished
    assert len(pulled) <= 3 + 3  # read only as slots free up, not the whole input
    session.release.set()
    rest = list(results)
    assert sorted(r.index for r in [first, *rest]) == list(range(1000))
    assert session.peak <= 3


def test_ordered_predict_many_holds_at_most_twice_the_workers(no_env):
    session = Gate()
    early = []

    def images():
        for i in range(50):
            if i >= 4 and not session.slow_done.is_set():
                early.append(i)  # read while image 0 is still in flight: more than 2 x workers held
            yield b"slow" if i == 0 else b"fast"

    # Image 0 is answered last, after its wait runs out (the Gate's release is never set): until then the
    # generator must hold at most 2 x 2 images.
    session.release_after = 1.0
    results = list(SegservClient(token="t", session=session).predict_many(images(), workers=2, progress=False,
                                                                          ordered=True))
    assert early == [] and [r.index for r in results] == list(range(50))


def test_breaking_out_of_predict_many_stops_sending(no_env):
    session = FakeSession(response(200, png_bytes(1, 1), "image/png"))
    results = SegservClient(token="t", session=session).predict_many([b"x"] * 100, workers=2, progress=False)
    next(results)
    results.close()
    assert len(session.calls) <= 4


def test_result_helpers_per_format(no_env, tmp_path):
    probs = np.random.default_rng(1).random((3, 4, 5)).astype(np.float16)
    buffer = io.BytesIO()
    np.save(buffer, probs)
    as_probs = Prediction(200, "application/x-npy", buffer.getvalue())
    assert np.array_equal(as_probs.probs(), probs) and as_probs.format == "probs"
    for helper, asks in (("mask", "format='png'"), ("instances", "format='instances'"), ("json", "format='json'"),
                         ("overlay", "format='overlay'")):
        with pytest.raises(FormatError, match=asks):
            getattr(as_probs, helper)()
    with pytest.raises(FormatError, match="format='probs'"):
        Prediction(200, "image/png", png_bytes(2, 2)).probs()
    jpeg = io.BytesIO()
    Image.new("RGB", (6, 4), (10, 20, 30)).save(jpeg, format="JPEG")
    assert Prediction(200, "image/jpeg", jpeg.getvalue()).overlay().size == (6, 4)
    instances = {"mask_format": "instances", "counts": [{"id": 1, "name": "cell", "count": 2},
                                                        {"id": 2, "name": "nucleus", "count": 0}],
                 "instances": [{"id": 1, "class_id": 1, "class": "cell", "area": 5},
                               {"id": 2, "class_id": 1, "class": "cell", "area": 7}]}
    as_instances = Prediction(200, "application/json", json.dumps(instances).encode())
    assert as_instances.format == "instances" and len(as_instances.instances()) == 2
    assert as_instances.areas() == {1: ("cell", 12), 2: ("nucleus", 0)}
    with pytest.raises(FormatError, match="instance_mask=True"):
        as_instances.instance_mask()
    ids = np.array([[0, 1], [300, 2]], np.uint16)
    instances["instance_mask"] = base64.b64encode(encode_image(Image.fromarray(ids))).decode()
    assert np.array_equal(Prediction(200, "application/json", json.dumps(instances).encode()).instance_mask(), ids)
    summary = {"mask_format": "png;base64", "classes": [{"id": 0, "name": "background", "pixels": 3},
                                                        {"id": 2, "name": "nucleus", "pixels": 1}]}
    assert Prediction(200, "application/json", json.dumps(summary).encode()).areas() == {
        0: ("background", 3), 2: ("nucleus", 1)}
    mask = palette_image(np.array([[0, 1, 1], [0, 0, 2]], np.uint8))
    assert Prediction(200, "image/png", encode_image(mask)).areas() == {0: (None, 3), 1: (None, 2), 2: (None, 1)}


def test_overlay_of_a_mask_answer_is_drawn_over_the_image_sent(no_env):
    labels = np.zeros((12, 16), np.uint8)
    labels[2:10, 3:12] = 1
    labels[5:7, 6:8] = 2
    mask = palette_image(labels, [0, 0, 0, 255, 0, 255, 0, 255, 255])
    image = np.full((12, 16, 3), 90, np.uint8)
    session = FakeSession(response(200, encode_image(mask), "image/png"))
    drawn = np.asarray(SegservClient(token="t", session=session).predict(image, format="png").overlay())
    assert (drawn[labels == 0] == 90).all()  # background left as it was
    assert drawn[2, 5].tolist() == [255, 0, 255]  # a region's boundary in its full colour
    assert drawn[4, 5].tolist() == [round(90 * 0.55 + 255 * 0.45), round(90 * 0.55), round(90 * 0.55 + 255 * 0.45)]
    assert drawn[5, 6].tolist() == [0, 255, 255]  # the nucleus' boundary, inside the cell
    with pytest.raises(FormatError, match="pass overlay"):
        Prediction(200, "image/png", encode_image(mask)).overlay()
    with pytest.raises(InputError, match="pass the image that was sent"):
        Prediction(200, "image/png", encode_image(mask)).overlay(image=np.zeros((3, 3), np.uint8))


def test_every_client_error_is_a_segserv_error_and_survives_pickling():
    import pickle

    from segserve.client import errors

    kinds = [getattr(errors, name) for name in dir(errors) if isinstance(getattr(errors, name), type)
             and issubclass(getattr(errors, name), Exception)]
    assert {k.__name__ for k in kinds} == {"SegservError", "ServerRefused", "Unreachable", "InputError",
                                           "InputTypeError", "FormatError", "KeyFileError"}
    for kind in kinds:
        error = pickle.loads(pickle.dumps(kind(400, "invalid_image", "cannot decode")))
        assert isinstance(error, SegservError) and (error.status, error.type, error.message) == (
            400, "invalid_image", "cannot decode")


def test_the_async_client_bounds_concurrency_and_yields_every_result(no_env):
    import asyncio

    from segserve.client import AsyncSegservClient

    session = Gate()
    session.release.set()

    async def run():
        async with AsyncSegservClient(token="t", session=session, concurrency=3) as client:
            one = await client.predict(b"fast", format="png")
            many = [r async for r in client.predict_many([b"fast"] * 20 + [42], format="png")]
            return one, many

    one, many = asyncio.run(run())
    assert one.mask().shape == (1, 1)
    assert sorted(r.index for r in many) == list(range(21)) and session.peak <= 3
    assert [type(r).__name__ for r in many if not isinstance(r, Prediction)] == ["InputTypeError"]


class Flaky(Answering):
    """A real HTTP server: 503 for the first `failures` requests, then a 3x2 PNG; remembers the last request.
    Like segserve, it refuses a format it lacks (its only one: png) with 400 invalid_option, naming its list."""

    failures = 2
    calls = 0
    last: dict = {}

    def do_POST(self):  # noqa: N802 - http.server's naming
        type(self).calls += 1
        type(self).last = {"path": self.path, "headers": dict(self.headers), "body": self.read_body()}
        asked = _form(type(self).last).get("format", (None, b"png"))[1]
        if type(self).calls <= type(self).failures:
            return self.send_json(503, {"code": 503, "type": "ServiceUnavailable", "message": "busy"})
        if asked != b"png":
            return self.send_json(400, {"code": 400, "type": "invalid_option",
                                        "message": f"format={asked.decode()!r} is not supported; use one of: png"})
        self.send_body(200, "image/png", png_bytes(3, 2))


@pytest.fixture()
def flaky_server():
    Flaky.calls, Flaky.failures = 0, 2
    with serving(loopback(Flaky)) as url:
        yield url


def _form(request: dict) -> dict:
    """The multipart body's parts, by field name: (filename, content)."""
    return form_fields(request["headers"]["Content-Type"], request["body"])


def test_retries_over_real_http_and_sends_a_multipart_form(no_env, flaky_server):
    client = SegservClient(flaky_server, token="t", retries=3, backoff=0.01)
    prediction = client.predict(b"\x89PNG...", format="png", classes="nucleus", min_area=3)
    assert Flaky.calls == 3 and prediction.mask().shape == (2, 3)
    assert Flaky.last["path"] == "/predictions/segmenter" and Flaky.last["headers"]["Authorization"] == "Bearer t"
    assert _form(Flaky.last) == {"data": ("image", b"\x89PNG..."), "format": (None, b"png"),
                                 "classes": (None, b"nucleus"), "min_area": (None, b"3")}


def test_cli_writes_one_file_per_image_and_reports_usage_errors(no_env, flaky_server, capsys):
    Flaky.failures = 0
    for folder in ("x", "y"):
        (no_env / folder).mkdir()
        (no_env / folder / "same.png").write_bytes(b"img")
    (no_env / "x" / "notes.txt").write_text("not an image")
    args = ["--url", flaky_server, "--token", "t", "--no-progress"]
    assert main(["predict", "x", "y/same.png", *args]) == 0
    assert sorted(str(p.relative_to(no_env / "masks")) for p in (no_env / "masks").rglob("*.png")) == [
        "x/same.png", "y/same.png"]
    assert "2 of 2 segmented into masks/" in capsys.readouterr().out
    assert main(["predict", "nowhere.png", *args]) == 2
    assert "no such file or folder: nowhere.png" in capsys.readouterr().err
    calls = Flaky.calls
    # The server's refusal of an option is a usage error (exit 2), with the server's list; nothing is written.
    assert main(["predict", "x", "y", "--format", "gif", "--workers", "1", "--out", "gif", *args]) == 2
    assert "segserve predict: format='gif' is not supported; use one of: png" in capsys.readouterr().err
    assert Flaky.calls == calls + 1 and not (no_env / "gif").exists()
    assert main(["predict", "x", "--workers", "0", *args]) == 2
    assert main([]) == 2


# -- integration: the real TorchServe -------------------------------------------------------------------
@pytest.fixture()
def client(server):
    return SegservClient(server.inference_url, key_file=server.workdir / "key_file.json",
                         management_url=server.management_url)


def scene_file(folder, name, seed, size):
    path = folder / name
    Image.fromarray(generate_scene(seed, size)[0]).save(path)
    return path


@pytest.mark.integration
def test_predict_json_and_png(client, server):
    assert client.token == server.keys()["inference"]  # read from the server's own key file
    image = Image.fromarray(generate_scene(81, (201, 333))[0])
    as_png = client.predict(image, format="png")
    as_json = client.predict(image)
    assert as_png.content_type == "image/png" and as_png.mask().shape == (201, 333)
    assert np.array_equal(as_png.mask(), as_json.mask())
    assert (as_json.json()["width"], as_json.json()["height"]) == (333, 201)


@pytest.mark.integration
def test_bad_input_raises_with_status(client):
    with pytest.raises(SegservError) as info:
        client.predict(b"definitely not an image")
    assert info.value.status == 400 and info.value.type == "invalid_image" and info.value.message


@pytest.mark.integration
def test_predict_many_isolates_a_bad_file(client, tmp_path):
    paths = [scene_file(tmp_path, f"scene{i}.png", 90 + i, (96, 120)) for i in range(5)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    paths.insert(2, bad)
    results = list(client.predict_many(paths, workers=3, progress=False, format="png", ordered=True))
    assert isinstance(results[2], SegservError) and results[2].status == 400
    assert all(r.mask().shape == (96, 120) for i, r in enumerate(results) if i != 2)


@pytest.mark.integration
def test_health_reports_ready_workers(client):
    report = client.health()
    assert report["healthy"] and report["ping"]["status"] == "Healthy"
    assert any(w["status"] == "READY" for w in report["workers"])


@pytest.mark.integration
def test_cli_end_to_end(server, tmp_path, capsys):
    img1 = scene_file(tmp_path, "img1.png", 95, (100, 140))
    img2 = scene_file(tmp_path, "img2.jpg", 96, (77, 51))
    keys = ["--url", server.inference_url, "--key-file", str(server.workdir / "key_file.json")]
    out = tmp_path / "out"
    assert main(["predict", str(img1), str(img2), "--format", "png", "--out", str(out), *keys, "--no-progress"]) == 0
    assert Image.open(out / "img1.png").size == (140, 100)
    assert Image.open(out / "img2.png").size == (51, 77)
    assert main(["predict", str(img2), "--format", "rle", "--out", str(out), "--no-progress", *keys]) == 0
    assert json.loads((out / "img2.json").read_text())["classes"][0]["rle"]
    assert main(["health", *keys, "--management-url", server.management_url]) == 0
    assert '"READY"' in capsys.readouterr().out
    assert main(["predict", str(img1), "--out", str(out), "--no-progress", "--url", server.inference_url,
                 "--token", "wrong", "--retries", "0", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "InvalidKeyException" in err and "refused the inference token from the token argument" in err
    assert main(["health", "--url", server.inference_url, "--token", "wrong", "--retries", "0"]) == 1


@pytest.mark.integration
def test_cli_options_the_server_lacks_are_usage_errors_naming_its_choices(server, tmp_path, capsys):
    image = scene_file(tmp_path, "img.png", 97, (40, 30))
    keys = ["--url", server.inference_url, "--key-file", str(server.workdir / "key_file.json"), "--no-progress"]
    assert main(["predict", str(image), "--format", "gif", "--out", str(tmp_path / "out"), *keys]) == 2
    err = capsys.readouterr().err
    assert "format='gif' is not supported; use one of: " in err and all(f in err for f in ("png", "rle", "json"))
    assert main(["predict", str(image), "--tile", "sideways", "--out", str(tmp_path / "out"), *keys]) == 2
    err = capsys.readouterr().err
    assert "tile='sideways' is not supported; use one of: " in err and all(m in err for m in ("auto", "on", "off"))
    assert main(["predict", str(image), "--classes", "unicorn", "--out", str(tmp_path / "out"), *keys]) == 2
    assert "'unicorn' is not a class of this model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
