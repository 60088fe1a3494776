"""A Python client for a segserve server: predictions with retries, many images at once, health.

    from segserve.client import SegservClient
    client = SegservClient("http://127.0.0.1:8080")          # token from ./run/key_file.json
    mask = client.predict("cells.png", format="png").mask()    # (H, W) uint8 class ids

Images go as multipart/form-data (file field `data`) with the options as plain form fields:
TorchServe drops URL query strings before the handler sees them, so options never travel there.
"""

from __future__ import annotations

import base64
import io
import json
import mimetypes
import os
import random
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import requests
from PIL import Image

DEFAULT_URL = "http://127.0.0.1:8080"
# TorchServe answers 503 when its queue is full and 507 when out of memory: both pass, so they are
# retried. Other 4xx are the caller's mistake and 500 is a bug: not retried, except WORKER_DIED.
RETRY_STATUSES = (503, 507)
# TorchServe 0.12 fails the batch a worker had in flight when that worker dies (killed, crashed, scaled
# down) with this message: 507 if it saw exit code 137, else 500 (a race on the exit code). The
# prediction never completed and is idempotent, so it is sent again; another worker takes it.
WORKER_DIED = "Worker died."
RETRY_EXCEPTIONS = (requests.ConnectionError, requests.Timeout)
MAX_DELAY = 30.0
DEFAULT_KEY_FILES = (Path("run/key_file.json"), Path("key_file.json"))
TOKEN_ENV = {"inference": "SEGSERVE_TOKEN", "management": "SEGSERVE_MANAGEMENT_TOKEN"}
EXTENSIONS = {"application/json": ".json", "image/png": ".png", "image/jpeg": ".jpg", "application/x-npy": ".npy"}
# Error types about the request's options, not its image (the server validates the options and names the
# choices): every other image would be refused the same way, so predict_many stops sending.
OPTION_ERRORS = ("invalid_option",)

ImageInput = str | Path | bytes | Image.Image


class SegservError(Exception):
    """The server refused or failed a request (or could not be reached: status 0).

    `status` is the HTTP status, `type` the server's error type (e.g. "invalid_image",
    "InvalidKeyException") and `message` says what went wrong and how to fix it.
    """

    def __init__(self, status: int, type: str, message: str):
        # Status 0 means no HTTP answer at all (unreachable server, unreadable file): leave it out.
        super().__init__(f"{status} {type}: {message}" if status else f"{type}: {message}")
        self.status, self.type, self.message = status, type, message


@dataclass
class Prediction:
    """One successful answer: the raw body plus helpers to read it the way its format needs."""

    status: int
    content_type: str
    content: bytes

    def json(self) -> Any:
        """The parsed body of a json, rle or polygons answer."""
        return json.loads(self.content)

    def mask(self) -> np.ndarray:
        """The class-id mask (H, W) uint8, from a png answer or the base64 PNG inside a json answer."""
        if self.content_type.startswith("image/png"):
            return _png_indices(self.content)
        if self.content_type.startswith("application/json"):
            doc = self.json()
            if isinstance(doc, dict) and "mask" in doc:
                return _png_indices(base64.b64decode(doc["mask"]))
        raise ValueError(f"a {self.content_type or 'untyped'} answer holds no mask image; "
                         "ask for format='png' or format='json'")

    @property
    def extension(self) -> str:
        """The file extension matching the content type (.json, .png, .jpg, .npy; .bin if unknown)."""
        return EXTENSIONS.get(self.content_type.split(";")[0].strip().lower(), ".bin")

    def save(self, path: str | Path) -> Path:
        """Write the body as it came, so a saved PNG/JPEG/NPY opens with any tool."""
        path = Path(path)
        path.write_bytes(self.content)
        return path


def _png_indices(data: bytes) -> np.ndarray:
    # A palette PNG's pixels are the class ids; np.asarray of a "P" image gives them without the colours.
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.uint8)


# -- tokens -----------------------------------------------------------------------------------------
def key_file_candidates(key_file: str | Path | None = None) -> list[Path]:
    """Where a key file is looked for: the one named (argument, else $SEGSERVE_KEY_FILE), else the defaults."""
    named = key_file or os.environ.get("SEGSERVE_KEY_FILE")
    return [Path(named)] if named else list(DEFAULT_KEY_FILES)


def read_key(kind: str, key_file: str | Path | None = None) -> str | None:
    """The `kind` ("inference" or "management") key from a TorchServe key_file.json, or None if none is found.

    A key file that was named (argument or $SEGSERVE_KEY_FILE) must exist: a typo should not silently
    fall back to another server's keys.
    """
    candidates = key_file_candidates(key_file)
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text())[kind]["key"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path} is not a TorchServe key file (no {kind}.key); "
                                 "use the key_file.json TorchServe wrote in the directory it started in") from None
    if key_file or os.environ.get("SEGSERVE_KEY_FILE"):
        raise FileNotFoundError(f"key file not found: {candidates[0]} (check --key-file / $SEGSERVE_KEY_FILE)")
    return None


def resolve_token(kind: str, token: str | None = None, key_file: str | Path | None = None) -> tuple[str | None, str]:
    """(token, where it came from): explicit token, then $SEGSERVE_TOKEN (or _MANAGEMENT_), then the key file."""
    if token:
        return token, "the token argument (--token)"
    if os.environ.get(TOKEN_ENV[kind]):
        return os.environ[TOKEN_ENV[kind]], f"${TOKEN_ENV[kind]}"
    found = read_key(kind, key_file)
    if found:
        path = next(p for p in key_file_candidates(key_file) if p.is_file())
        return found, f"{path} ({kind}.key)"
    places = " or ".join(str(p) for p in key_file_candidates(key_file))
    return None, f"no token argument (--token), no ${TOKEN_ENV[kind]} and no key file at {places}"


def default_management_url(base_url: str) -> str | None:
    """TorchServe's default layout: inference on 8080, management on 8081. Other ports: unknown."""
    parts = urlsplit(base_url)
    if parts.port != 8080:
        return None
    return urlunsplit(parts._replace(netloc=f"{parts.hostname}:8081"))


# -- the client ---------------------------------------------------------------------------------------
class SegservClient:
    """Talks to one model on one server; safe to share between threads (predict_many does)."""

    def __init__(self, base_url: str | None = None, model: str = "segmenter", version: str | None = None,
                 token: str | None = None, key_file: str | Path | None = None, management_url: str | None = None,
                 timeout: float = 120, retries: int = 4, backoff: float = 0.5,
                 session: requests.Session | None = None, management_token: str | None = None):
        self.base_url = (base_url or os.environ.get("SEGSERVE_URL") or DEFAULT_URL).rstrip("/")
        self.model, self.version = model, version
        self.token, self.token_source = resolve_token("inference", token, key_file)
        self.management_url = (management_url or os.environ.get("SEGSERVE_MANAGEMENT_URL")
                               or default_management_url(self.base_url))
        self.management_url = self.management_url.rstrip("/") if self.management_url else None
        self.management_token, _ = resolve_token("management", management_token, key_file)
        self.timeout, self.retries, self.backoff = timeout, max(0, retries), backoff
        self._own_session = session is None
        self.session = session or requests.Session()
        self._pool_size = 0
        self._ensure_pool(10)

    def _ensure_pool(self, size: int) -> None:
        """Keep-alive connections for `size` threads; a session passed in is left exactly as it was given."""
        if self._own_session and size > self._pool_size:
            adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=size)
            self.session.mount("http://", adapter)
            self.session.mount("https://", adapter)
            self._pool_size = size

    @property
    def predict_url(self) -> str:
        version = f"/{self.version}" if self.version else ""
        return f"{self.base_url}/predictions/{self.model}{version}"

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry `attempt` (0-based): exponential, with jitter so clients spread out."""
        return min(MAX_DELAY, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.5)

    def _send(self, method: str, url: str, token: str | None, retries: int | None = None,
              **kwargs: Any) -> requests.Response:
        """One call, retried on 503/507, "Worker died." and connection errors/timeouts; the last answer or error
        passes up."""
        retries = self.retries if retries is None else retries
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        for attempt in range(retries + 1):
            try:
                response = self.session.request(method, url, headers=headers, timeout=self.timeout, **kwargs)
            except RETRY_EXCEPTIONS:
                if attempt == retries:
                    raise
            else:
                if not _retryable(response) or attempt == retries:
                    return response
            time.sleep(self.delay(attempt))
        raise AssertionError("unreachable")

    def predict(self, image: ImageInput, format: str = "json", classes: Iterable[str | int] | str | None = None,
                min_area: int | None = None, tile: str | None = None, threshold: float | None = None,
                smooth: int | None = None, smooth_method: str | None = None, fill_holes: bool | None = None,
                instance_mask: bool | None = None) -> Prediction:
        """Segment one image (a path, encoded bytes, or a PIL image, sent as PNG); raise SegservError on failure.

        `tile`: "auto" (the server's default), "on" or "off": sliding-window inference at the image's own scale.
        `threshold`, `smooth` (radius in pixels), `smooth_method` (median, open, close), `fill_holes` and
        `min_area` post-process the masks (docs/api.md); None leaves the model's default.
        `instance_mask`: with format="instances", also the uint16 instance-id PNG.
        """
        name, data, media = _image_part(image)
        fields = {"format": format}
        if tile is not None:
            fields["tile"] = tile
        if classes is not None:
            fields["classes"] = classes if isinstance(classes, str) else ",".join(str(c) for c in classes)
        for key, value in (("min_area", min_area), ("threshold", threshold), ("smooth", smooth),
                           ("smooth_method", smooth_method), ("fill_holes", fill_holes),
                           ("instance_mask", instance_mask)):
            if value is not None:
                fields[key] = str(value).lower() if isinstance(value, bool) else str(value)
        try:
            response = self._send("POST", self.predict_url, self.token, files={"data": (name, data, media)},
                                  data=fields)
        except RETRY_EXCEPTIONS as exc:
            raise self._unreachable(self.base_url, exc) from None
        if response.status_code != 200:
            raise self._error(response)
        return Prediction(200, response.headers.get("Content-Type", ""), response.content)

    def predict_many(self, images: Iterable[ImageInput], workers: int = 4, progress: bool = True,
                     **options: Any) -> list[Prediction | SegservError]:
        """Predict every image with `workers` requests in flight, in input order.

        A failure (server error, unreadable file) is returned in its own slot as a SegservError
        instead of being raised, so one bad image does not cost the results of the others. An option
        the server refuses (OPTION_ERRORS) would be refused for every image: no further image is sent,
        and the slots of those not sent hold that same error.
        """
        from tqdm import tqdm

        images = list(images)
        workers = max(1, min(workers, len(images) or 1))
        self._ensure_pool(workers)
        results: list[Prediction | SegservError | None] = [None] * len(images)
        refused: SegservError | None = None
        waiting = iter(enumerate(images))
        in_flight: dict = {}
        with (ThreadPoolExecutor(workers) as pool,
              tqdm(total=len(images), desc="segmenting", unit="img", disable=not progress) as bar):

            def send_next() -> None:
                item = next(waiting, None)
                if item is not None:
                    in_flight[pool.submit(self._predict_or_error, item[1], options)] = item[0]

            for _ in range(workers):  # then one more each time one comes back, so that a refusal stops the rest
                send_next()
            while in_flight:
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    result = results[in_flight.pop(future)] = future.result()
                    bar.update()
                    if refused is None and isinstance(result, SegservError) and result.type in OPTION_ERRORS:
                        refused = result
                    if refused is None:
                        send_next()
            for i, _ in waiting:  # not sent: refused like the others
                results[i] = refused
                bar.update()
        return results  # type: ignore[return-value]

    def _predict_or_error(self, image: ImageInput, options: dict) -> Prediction | SegservError:
        try:
            return self.predict(image, **options)
        except SegservError as exc:
            return exc
        except OSError as exc:  # the file could not be read: a client-side failure for this slot only
            return SegservError(0, "unreadable_file", f"cannot read {image}: {exc.strerror or exc}")

    def health(self) -> dict:
        """{"healthy", "url", "ping", and "workers" when a management URL and key are known}.

        Healthy means ping answers "Healthy" and, when workers can be listed, at least one is READY.
        A probe should answer fast, so it retries at most once.
        """
        report: dict[str, Any] = {"healthy": False, "url": self.base_url}
        retries = min(self.retries, 1)
        try:
            ping = self._send("GET", f"{self.base_url}/ping", self.token, retries=retries)
        except RETRY_EXCEPTIONS as exc:
            report["error"] = self._unreachable(self.base_url, exc, retries).message
            return report
        report["ping"] = _body(ping)
        report["healthy"] = ping.status_code == 200 and report["ping"].get("status") == "Healthy"
        if ping.status_code != 200:
            report["error"] = self._error(ping).message
        if self.management_url and self.management_token:
            url = f"{self.management_url}/models/{self.model}"
            try:
                described = self._send("GET", url, self.management_token, retries=retries)
            except RETRY_EXCEPTIONS as exc:
                report["workers_error"] = self._unreachable(self.management_url, exc, retries).message
                return report
            if described.status_code == 200:
                workers = (described.json() or [{}])[0].get("workers", [])
                report["workers"] = [{"id": w.get("id"), "status": w.get("status"), "pid": w.get("pid")}
                                     for w in workers]
                report["healthy"] = report["healthy"] and any(w["status"] == "READY" for w in report["workers"])
            else:
                report["workers_error"] = f"{described.status_code}: {_body(described).get('message', '')}"
        return report

    # -- errors -------------------------------------------------------------------------------------
    def _unreachable(self, url: str, exc: Exception, retries: int | None = None) -> SegservError:
        tries = (self.retries if retries is None else retries) + 1
        attempts = f"{tries} attempts" if tries > 1 else "1 attempt"
        return SegservError(0, "connection_error",
                            f"cannot reach {url} ({type(exc).__name__}, {attempts}): is the server running "
                            "(`make serve`) and is the URL right (--url / $SEGSERVE_URL)?")

    def _error(self, response: requests.Response) -> SegservError:
        """A SegservError from a JSON error body ({"code", "type", "message"}) or whatever text came back."""
        body = _body(response)
        kind = str(body.get("type") or "http_error")
        message = str(body.get("message") or body.get("body") or response.reason or "")
        if kind == "InvalidKeyException" or response.status_code == 401:
            if self.token is None:
                message = (f"{message} -- no inference token was sent: found {self.token_source}. Pass the "
                           "inference.key of the key_file.json TorchServe wrote where it started (run/ for "
                           "`make serve`) with --token, $SEGSERVE_TOKEN or --key-file")
            else:
                message = (f"{message} -- the server refused the inference token from {self.token_source}. "
                           "Keys change every time TorchServe starts: use the current inference.key of its "
                           "key_file.json (--token, $SEGSERVE_TOKEN or --key-file)")
        return SegservError(response.status_code, kind, message)


def _image_part(image: ImageInput) -> tuple[str, bytes, str]:
    """(filename, bytes, content type) for the multipart `data` field."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "image.png", buffer.getvalue(), "image/png"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "image", bytes(image), "application/octet-stream"
    path = Path(image)
    return path.name, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _retryable(response: requests.Response) -> bool:
    if response.status_code in RETRY_STATUSES:
        return True
    return response.status_code == 500 and _body(response).get("message") == WORKER_DIED


def _body(response: requests.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {"body": response.text[:300].strip()}
    return body if isinstance(body, dict) else {"body": body}
