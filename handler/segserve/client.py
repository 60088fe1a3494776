"""A Python client for a segserve server: predictions with retries, many images at once, health.

    from segserve.client import SegservClient
    client = SegservClient("http://127.0.0.1:8080")          # token from ./run/key_file.json
    mask = client.predict("cells.png", format="png").mask()    # (H, W) uint8 class ids

Images go as multipart/form-data (field `data`) with options as form fields:
TorchServe drops URL query strings, so options never travel there.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import requests
from PIL import Image

RETRY_STATUSES = (503, 507)  # queue full or worker lost; out of memory
DEFAULT_KEY_FILES = (Path("run/key_file.json"), Path("key_file.json"))
EXTENSIONS = {"application/json": ".json", "image/png": ".png", "image/jpeg": ".jpg", "application/x-npy": ".npy"}


class SegservError(Exception):
    """The server refused or failed a request: HTTP status, error type and the server's message."""

    def __init__(self, status: int, type: str, message: str):
        super().__init__(f"{status} {type}: {message}")
        self.status, self.type, self.message = status, type, message


@dataclass
class Prediction:
    status: int
    content_type: str
    content: bytes

    def json(self) -> dict:
        return json.loads(self.content)

    def mask(self) -> np.ndarray:
        """The class-id mask (H, W) uint8, from a png or json response."""
        if self.content_type.startswith("image/png"):
            return np.asarray(Image.open(io.BytesIO(self.content)))
        if self.content_type.startswith("application/json") and "mask" in self.json():
            return np.asarray(Image.open(io.BytesIO(base64.b64decode(self.json()["mask"]))))
        raise ValueError(f"a {self.content_type} response holds no mask image; ask for format png or json")

    @property
    def extension(self) -> str:
        return EXTENSIONS.get(self.content_type.split(";")[0], ".bin")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.content)
        return path


def read_key(kind: str, key_file: str | Path | None = None) -> str | None:
    """The `kind` ("inference" or "management") key from a TorchServe key_file.json."""
    candidates = [Path(key_file)] if key_file else [Path(p) for p in (os.environ.get("SEGSERVE_KEY_FILE"),) if p]
    candidates += [] if key_file else list(DEFAULT_KEY_FILES)
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text())[kind]["key"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path} is not a TorchServe key file (no {kind}.key)") from None
    if key_file:
        raise FileNotFoundError(f"key file not found: {key_file}")
    return None


def _management_url(base_url: str) -> str | None:
    parts = urlsplit(base_url)
    if parts.port is None:
        return None
    return urlunsplit(parts._replace(netloc=f"{parts.hostname}:{parts.port + 1}"))


class SegservClient:
    def __init__(self, base_url: str | None = None, model: str = "segmenter", version: str | None = None,
                 token: str | None = None, key_file: str | Path | None = None, management_url: str | None = None,
                 management_token: str | None = None, timeout: float = 120, retries: int = 4,
                 backoff: float = 0.5, session: requests.Session | None = None):
        self.base_url = (base_url or os.environ.get("SEGSERVE_URL") or "http://127.0.0.1:8080").rstrip("/")
        self.model, self.version = model, version
        self.token = token or os.environ.get("SEGSERVE_TOKEN") or read_key("inference", key_file)
        self.management_url = management_url or _management_url(self.base_url)
        self.management_token = (management_token or os.environ.get("SEGSERVE_MANAGEMENT_TOKEN")
                                 or read_key("management", key_file))
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.session = session or requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=32)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    @property
    def predict_url(self) -> str:
        version = f"/{self.version}" if self.version else ""
        return f"{self.base_url}/predictions/{self.model}{version}"

    def _headers(self, token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _send(self, method: str, url: str, token: str | None, **kwargs) -> requests.Response:
        """One call with retries on 503/507 and connection errors, exponential backoff with jitter."""
        for attempt in range(self.retries + 1):
            try:
                response = self.session.request(method, url, headers=self._headers(token), timeout=self.timeout,
                                                **kwargs)
                if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                    return response
            except (requests.ConnectionError, requests.Timeout):
                if attempt == self.retries:
                    raise
            time.sleep(self.backoff * 2 ** attempt * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def predict(self, image: str | Path | bytes | Image.Image, format: str = "json",
                classes: Iterable[str | int] | str | None = None, min_area: int | None = None) -> Prediction:
        name, data, media = _image_part(image)
        fields = {"format": format}
        if classes is not None:
            fields["classes"] = classes if isinstance(classes, str) else ",".join(str(c) for c in classes)
        if min_area is not None:
            fields["min_area"] = str(min_area)
        try:
            response = self._send("POST", self.predict_url, self.token, files={"data": (name, data, media)},
                                  data=fields)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise SegservError(0, "connection_error", f"cannot reach {self.base_url}: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise _error(response, self.token)
        return Prediction(200, response.headers.get("content-type", ""), response.content)

    def predict_many(self, images: list, workers: int = 4, progress: bool = True,
                     **options: Any) -> list[Prediction | SegservError]:
        """Predict every image with `workers` requests in flight; a failure takes only its own slot."""
        from tqdm import tqdm

        def one(image):
            try:
                return self.predict(image, **options)
            except (SegservError, OSError, ValueError) as exc:
                return exc if isinstance(exc, SegservError) else SegservError(0, "client_error", str(exc))

        with ThreadPoolExecutor(max(1, workers)) as pool:
            results = pool.map(one, images)
            return list(tqdm(results, total=len(images), desc="segmenting", unit="img", disable=not progress))

    def health(self) -> dict:
        """Ping, plus the model's workers when the management API and key are available."""
        report: dict[str, Any] = {"healthy": False, "url": self.base_url}
        try:
            ping = self._send("GET", f"{self.base_url}/ping", self.token)
            report["ping"] = _body(ping)
            report["healthy"] = ping.status_code == 200 and report["ping"].get("status") == "Healthy"
        except (requests.ConnectionError, requests.Timeout) as exc:
            report["ping"] = {"error": f"cannot reach {self.base_url}: {type(exc).__name__}"}
            return report
        if self.management_url and self.management_token:
            try:
                described = self._send("GET", f"{self.management_url}/models/{self.model}", self.management_token)
                if described.status_code == 200:
                    workers = described.json()[0].get("workers", [])
                    report["workers"] = [{"id": w.get("id"), "status": w.get("status"), "pid": w.get("pid")}
                                         for w in workers]
                    report["healthy"] = report["healthy"] and any(w["status"] == "READY" for w in report["workers"])
                else:
                    report["workers_error"] = _body(described)
            except (requests.ConnectionError, requests.Timeout):
                report["workers_error"] = {"error": f"cannot reach {self.management_url}"}
        return report


def _image_part(image: str | Path | bytes | Image.Image) -> tuple[str, bytes, str]:
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "image.png", buffer.getvalue(), "image/png"
    if isinstance(image, (bytes, bytearray)):
        return "image", bytes(image), "application/octet-stream"
    path = Path(image)
    return path.name, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _body(response: requests.Response) -> dict:
    try:
        body = response.json()
        return body if isinstance(body, dict) else {"body": body}
    except ValueError:
        return {"body": response.text[:200]}


def _error(response: requests.Response, token: str | None) -> SegservError:
    body = _body(response)
    kind = str(body.get("type", "http_error"))
    message = str(body.get("message", body.get("body", "")))
    if kind == "InvalidKeyException":
        where = "the token given" if token else "no token found (SEGSERVE_TOKEN, --token, ./run/key_file.json)"
        message = f"{message} [{where}]"
    return SegservError(response.status_code, kind, message)
