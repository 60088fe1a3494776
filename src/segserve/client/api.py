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
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import requests
from PIL import Image, ImageOps

from .errors import FormatError, InputError, InputTypeError, KeyFileError, SegservError, ServerRefused, Unreachable

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
EXTENSIONS = {"application/json": ".json", "image/png": ".png", "image/jpeg": ".jpg", "application/x-npy": ".npy",
              "application/dicom": ".dcm", "application/gzip": ".nii.gz", "application/zip": ".zip"}
# Error types about the request's options, not its image (the server validates the options and names the
# choices): every other image would be refused the same way, so predict_many stops sending.
OPTION_ERRORS = ("invalid_option",)

# What predict takes: a path, encoded image bytes, a numpy array (H, W) or (H, W, 3|4) of uint8, (H, W) of
# uint16, or a PIL image. Arrays and PIL images are sent as lossless PNG.
ImageInput = str | os.PathLike | bytes | bytearray | memoryview | np.ndarray | Image.Image
# An answer's format, from its content type; JSON answers name theirs in `mask_format`.
FORMAT_OF_TYPE = {"image/png": "png", "image/jpeg": "overlay", "application/x-npy": "probs"}
FORMAT_OF_MASK_FORMAT = {"png;base64": "json", "coco_rle": "rle", "polygons": "polygons", "instances": "instances"}


@dataclass
class Prediction:
    """One successful answer: the raw body plus helpers to read it the way its format needs.

    `source` is the image it answers (what was passed to predict) and `index` its position in predict_many's
    input; a helper the answer's format cannot serve raises FormatError naming the format to ask for.
    """

    status: int
    content_type: str
    content: bytes
    source: Any = field(default=None, repr=False)
    index: int | None = None

    @property
    def media_type(self) -> str:
        return self.content_type.split(";")[0].strip().lower()

    @property
    def format(self) -> str:
        """The answer's format (json, png, rle, polygons, instances, overlay, probs; another JSON answer's
        mask_format as it came)."""
        if self.media_type in FORMAT_OF_TYPE:
            return FORMAT_OF_TYPE[self.media_type]
        if self.media_type == "application/json":
            doc = self.json()
            kind = doc.get("mask_format") if isinstance(doc, dict) else None
            return FORMAT_OF_MASK_FORMAT.get(kind, kind or "json")
        return self.media_type or "unknown"

    def json(self) -> Any:
        """The parsed body of a JSON answer (json, rle, polygons, instances)."""
        if self.media_type != "application/json":
            raise FormatError(0, "not_json", f"a {self.media_type or 'untyped'} answer is not JSON; ask for "
                                             "format='json' (or rle, polygons, instances)")
        return json.loads(self.content)

    def mask(self) -> np.ndarray:
        """The class-id mask (H, W) uint8, from a png answer or the base64 PNG inside a json answer."""
        return np.asarray(self._mask_image(), dtype=np.uint8)

    def probs(self) -> np.ndarray:
        """The per-class probabilities (classes, H, W) float16 of a probs answer."""
        if self.media_type != "application/x-npy":
            raise FormatError(0, "no_probs", f"a {self.format} answer holds no probabilities; ask for format='probs'")
        return np.load(io.BytesIO(self.content), allow_pickle=False)

    def instances(self) -> list[dict]:
        """The regions of an instances answer: per region id, class_id, class, area, bbox and centroid."""
        doc = self.json() if self.media_type == "application/json" else None
        if not isinstance(doc, dict) or "instances" not in doc:
            raise FormatError(0, "no_instances", f"a {self.format} answer holds no instances; "
                                                 "ask for format='instances'")
        return doc["instances"]

    def instance_mask(self) -> np.ndarray:
        """The instance ids (H, W) uint16 (0 = none) of an instances answer asked with instance_mask=True."""
        self.instances()
        doc = self.json()
        if "instance_mask" not in doc:
            raise FormatError(0, "no_instance_mask", "this instances answer has no instance mask; ask for "
                                                     "format='instances' with instance_mask=True")
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(doc["instance_mask"]))), dtype=np.uint16)

    def overlay(self, image: ImageInput | None = None, alpha: float = 0.45) -> Image.Image:
        """An RGB picture of the result: an overlay answer's JPEG as it came; for a png or json answer, the mask's
        class colours blended over `image` (default: the image that was sent) with each region outlined."""
        if self.media_type == "image/jpeg":
            return Image.open(io.BytesIO(self.content)).convert("RGB")
        try:
            mask_image = self._mask_image()
        except FormatError:
            raise FormatError(0, "no_overlay", f"a {self.format} answer cannot be drawn; ask for format='overlay' "
                                               "(or png / json, drawn over the image sent)") from None
        picture = image if image is not None else self.source
        if picture is None:
            raise FormatError(0, "no_overlay", "this answer does not know its image: pass overlay(image=...)")
        return blend(as_pil(picture), np.asarray(mask_image, np.uint8), mask_image.getpalette() or [], alpha)

    def areas(self) -> dict[int, tuple[str | None, int]]:
        """Pixels per class: {class id: (name or None, pixels)}. From a json or rle answer's classes, a polygons
        answer's features, an instances answer's regions (their areas summed) or a png mask (counted; a PNG
        holds no names)."""
        if self.media_type == "image/png":
            counts = np.bincount(self.mask().ravel())
            return {i: (None, int(n)) for i, n in enumerate(counts) if n}
        doc = self.json() if self.media_type == "application/json" else None
        if isinstance(doc, dict) and isinstance(doc.get("classes"), list) and all(
                "pixels" in c for c in doc["classes"]):
            return {int(c["id"]): (c.get("name"), int(c["pixels"])) for c in doc["classes"]}
        if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":  # polygons: GeoJSON features
            return {int(f["properties"]["class_id"]): (f["properties"].get("class"), int(f["properties"]["area"]))
                    for f in doc.get("features", [])}
        if isinstance(doc, dict) and "instances" in doc:
            found = {int(c["id"]): (c.get("name"), 0) for c in doc.get("counts", [])}
            for region in doc["instances"]:
                name, pixels = found.get(int(region["class_id"]), (region.get("class"), 0))
                found[int(region["class_id"])] = (name, pixels + int(region["area"]))
            return found
        raise FormatError(0, "no_areas", f"a {self.format} answer has no per-class areas; ask for format='json' "
                                         "(or png, rle, polygons, instances)")

    @property
    def extension(self) -> str:
        """The file extension matching the content type (.json, .png, .jpg, .npy; .bin if unknown)."""
        return EXTENSIONS.get(self.media_type, ".bin")

    def save(self, path: str | Path) -> Path:
        """Write the body as it came, so a saved PNG/JPEG/NPY opens with any tool."""
        path = Path(path)
        path.write_bytes(self.content)
        return path

    def _mask_image(self) -> Image.Image:
        if self.media_type == "image/png":
            return Image.open(io.BytesIO(self.content))
        if self.media_type == "application/json":
            doc = self.json()
            if isinstance(doc, dict) and "mask" in doc:
                return Image.open(io.BytesIO(base64.b64decode(doc["mask"])))
        raise FormatError(0, "no_mask", f"a {self.format} answer holds no mask image; "
                                        "ask for format='png' or format='json'")


def as_pil(image: ImageInput) -> Image.Image:
    """The image as the server reads it: decoded, EXIF orientation applied (so it lines up with the mask)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(_checked_array(image))
    _, data, _ = _image_part(image)
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data)))


def blend(image: Image.Image, mask: np.ndarray, palette: list[int], alpha: float = 0.45) -> Image.Image:
    """`image` in grey with the class colours of `palette` (a PNG palette, [r, g, b, ...]) blended over it where the
    mask is not background and each region's boundary in its full colour: drawn as the server's overlay format
    is, so the regions read against a stain of any hue."""
    rgb = np.asarray(image.convert("L"), dtype=np.float32)[..., None].repeat(3, axis=2)
    if rgb.shape[:2] != mask.shape:
        raise InputError(0, "size_mismatch", f"the image is {rgb.shape[1]}x{rgb.shape[0]} but the mask "
                                             f"{mask.shape[1]}x{mask.shape[0]}: pass the image that was sent")
    colors = np.zeros((256, 3), np.float32)
    table = np.asarray(palette[: 256 * 3], np.float32).reshape(-1, 3)
    colors[: len(table)] = table
    out = np.where((mask > 0)[..., None], rgb * (1 - alpha) + colors[mask] * alpha, rgb)
    edge = np.zeros(mask.shape, bool)  # a pixel with a 4-neighbour of another class
    across, down = mask[:, :-1] != mask[:, 1:], mask[:-1, :] != mask[1:, :]
    edge[:, :-1] |= across
    edge[:, 1:] |= across
    edge[:-1, :] |= down
    edge[1:, :] |= down
    edge &= mask > 0
    out[edge] = colors[mask[edge]]
    return Image.fromarray(out.round().astype(np.uint8), "RGB")


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
                raise KeyFileError(0, "invalid_key_file", f"{path} is not a TorchServe key file (no {kind}.key); "
                                   "use the key_file.json TorchServe wrote in the directory it started in") from None
    if key_file or os.environ.get("SEGSERVE_KEY_FILE"):
        raise KeyFileError(0, "key_file_not_found",
                           f"key file not found: {candidates[0]} (check --key-file / $SEGSERVE_KEY_FILE)")
    return None


def resolve_token(kind: str, token: str | None = None, key_file: str | Path | None = None) -> tuple[str | None, str]:
    """(token, where it came from): explicit token, then $SEGSERVE_TOKEN (or _MANAGEMENT_), then the key file."""
    if token:
        return token, "the token argument (--token)" if kind == "inference" else \
            "the management token argument (--management-token)"
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
        self.management_token, self.management_token_source = resolve_token("management", management_token, key_file)
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
                instance_mask: bool | None = None, window: str | None = None,
                axis: int | None = None) -> Prediction:
        """Segment one image: a path, encoded bytes, a numpy array ((H, W) or (H, W, 3) uint8) or a PIL image
        (arrays and PIL images go as PNG). Raises a SegservError: ServerRefused, Unreachable, InputError.

        `tile`: "auto" (the server's default), "on" or "off": sliding-window inference at the image's own scale.
        `threshold`, `smooth` (radius in pixels), `smooth_method` (median, open, close), `fill_holes` and
        `min_area` post-process the masks (docs/api.md); None leaves the model's default.
        `instance_mask`: with format="instances", also the uint16 instance-id PNG.
        `window` (DICOM and NIfTI: "file", a preset's name or "center,width") and `axis` (NIfTI: the slice axis,
        0-2) change how a medical image is read (docs/medical.md); the server refuses them for other images.
        """
        name, data, media = _image_part(image)
        fields = {"format": format}
        if tile is not None:
            fields["tile"] = tile
        if classes is not None:
            fields["classes"] = classes if isinstance(classes, str) else ",".join(str(c) for c in classes)
        for key, value in (("min_area", min_area), ("threshold", threshold), ("smooth", smooth),
                           ("smooth_method", smooth_method), ("fill_holes", fill_holes),
                           ("instance_mask", instance_mask), ("window", window), ("axis", axis)):
            if value is not None:
                fields[key] = str(value).lower() if isinstance(value, bool) else str(value)
        try:
            response = self._send("POST", self.predict_url, self.token, files={"data": (name, data, media)},
                                  data=fields)
        except requests.RequestException as exc:
            raise self._unreachable(self.base_url, exc) from None
        if response.status_code != 200:
            raise self._error(response)
        return Prediction(200, response.headers.get("Content-Type", ""), response.content, source=image)

    def predict_many(self, images: Iterable[ImageInput], workers: int = 4, progress: bool = True,
                     ordered: bool = False, **options: Any) -> Iterator[Prediction | SegservError]:
        """Predict every image with `workers` requests in flight; yield each result as it finishes.

        A generator: images are read and sent only as slots free up, and at most 2 × `workers` answers are
        held at once (in flight or, with `ordered`, waiting for an earlier one), however many images there are.
        Each item is a Prediction or, for an image that failed (server error, unreadable file, a type the
        client does not take), the SegservError in its place: one bad image does not cost the others. Both
        carry `index` (the position in `images`) and `source` (the input). `ordered=True` yields in input order.
        An option the server refuses (OPTION_ERRORS) would be refused for every image: no further image is
        sent, and each image not sent is yielded with that same error.
        """
        from tqdm import tqdm

        total = len(images) if hasattr(images, "__len__") else None  # type: ignore[arg-type]
        workers = max(1, min(workers, total or workers))
        self._ensure_pool(workers)
        window = 2 * workers
        waiting = enumerate(images)
        in_flight: dict[Future, int] = {}
        finished: dict[int, Prediction | SegservError] = {}  # done, not yet yielded (ordered only)
        next_out = 0
        refused: SegservError | None = None
        pool = ThreadPoolExecutor(workers, thread_name_prefix="segserve-predict")
        bar = tqdm(total=total, desc="segmenting", unit="img", disable=not progress)
        try:
            def send_more() -> None:
                while refused is None and len(in_flight) < workers and len(in_flight) + len(finished) < window:
                    item = next(waiting, None)
                    if item is None:
                        return
                    in_flight[pool.submit(self._predict_or_error, *item, options)] = item[0]

            send_more()
            while in_flight:
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=in_flight.__getitem__):
                    result = future.result()
                    del in_flight[future]
                    bar.update()
                    if refused is None and isinstance(result, SegservError) and result.type in OPTION_ERRORS:
                        refused = result
                    if not ordered:
                        yield result
                        continue
                    finished[result.index] = result
                    while next_out in finished:
                        yield finished.pop(next_out)
                        next_out += 1
                send_more()
            for index, image in waiting if refused is not None else ():  # not sent: refused like the others
                bar.update()
                yield refused.copy_for(index, image)
        finally:  # also on break, close() or Ctrl-C: nothing more is sent; requests in flight run out
            bar.close()
            pool.shutdown(wait=False, cancel_futures=True)

    def _predict_or_error(self, index: int, image: ImageInput, options: dict) -> Prediction | SegservError:
        try:
            result = self.predict(image, **options)
        except SegservError as exc:
            result = exc
        except Exception as exc:  # noqa: BLE001 - a bug or odd input must cost one slot, not the whole run
            result = SegservError(0, "client_error", f"{type(exc).__name__}: {exc}")
        result.index, result.source = index, image
        return result

    def models(self) -> list[dict]:
        """What the server serves: per model and version, TorchServe's description (workers, batch size, ...)
        with segserve's own (`customizedMetadata`: classes, head, input size, post-processing defaults).

        Needs the management API (management_url, $SEGSERVE_MANAGEMENT_URL or :8081 beside :8080) and its key.
        """
        if not self.management_url:
            raise Unreachable(0, "no_management_url", f"no management URL for {self.base_url}: pass "
                              "--management-url / $SEGSERVE_MANAGEMENT_URL (TorchServe's default is port 8081)")
        names, token = [], None
        while True:  # GET /models pages its list (limit, nextPageToken)
            query = {"limit": 100, **({"next_page_token": token} if token else {})}
            listed = self._management("GET", "/models", params=query)
            names += [m["modelName"] for m in listed.get("models", [])]
            token = listed.get("nextPageToken")
            if not token:
                break
        described = []
        for name in names:
            # TorchServe adds customizedMetadata for one version at a time: list the versions, then describe each.
            for listed in self._management("GET", f"/models/{name}/all"):
                version_name = listed.get("modelVersion")
                path = f"/models/{name}/{version_name}" if version_name else f"/models/{name}"
                (version,) = self._management("GET", path, params={"customized": "true"})[:1] or [listed]
                metadata = version.get("customizedMetadata")
                if isinstance(metadata, str):  # TorchServe passes the handler's JSON through as a string
                    try:
                        version["customizedMetadata"] = json.loads(metadata)
                    except ValueError:
                        pass
                described.append(version)
        return described

    def _management(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._send(method, f"{self.management_url}{path}", self.management_token, **kwargs)
        except requests.RequestException as exc:
            raise self._unreachable(self.management_url, exc) from None
        if response.status_code != 200:
            raise self._error(response, api="management")
        return response.json()

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
        return Unreachable(0, "connection_error",
                           f"cannot reach {url} ({type(exc).__name__}, {attempts}): is the server running "
                           "(`make serve`) and is the URL right (--url / $SEGSERVE_URL)?")

    def _error(self, response: requests.Response, api: str = "inference") -> SegservError:
        """A ServerRefused from a JSON error body ({"code", "type", "message"}) or whatever text came back."""
        body = _body(response)
        kind = str(body.get("type") or "http_error")
        message = str(body.get("message") or body.get("body") or response.reason or "")
        token, source = ((self.token, self.token_source) if api == "inference"
                         else (self.management_token, self.management_token_source))
        flag, env = ("--token, $SEGSERVE_TOKEN", "inference") if api == "inference" else (
            "--management-token, $SEGSERVE_MANAGEMENT_TOKEN", "management")
        if kind == "InvalidKeyException" or response.status_code == 401:
            if token is None:
                message = (f"{message} -- no {env} token was sent: found {source}. Pass the {env}.key of the "
                           "key_file.json TorchServe wrote where it started (run/ for `make serve`) with "
                           f"{flag} or --key-file")
            else:
                message = (f"{message} -- the server refused the {env} token from {source}. Keys change every "
                           f"time TorchServe starts: use the current {env}.key of its key_file.json ({flag} "
                           "or --key-file)")
        return ServerRefused(response.status_code, kind, message)


def _image_part(image: ImageInput) -> tuple[str, bytes, str]:
    """(filename, bytes, content type) for the multipart `data` field; InputError for what cannot be sent."""
    if isinstance(image, Image.Image):
        return "image.png", _png(image), "image/png"
    if isinstance(image, np.ndarray):
        return "image.png", _png(Image.fromarray(_checked_array(image))), "image/png"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "image", bytes(image), "application/octet-stream"
    if not isinstance(image, (str, os.PathLike)):
        raise InputTypeError(0, "unsupported_input", f"cannot send a {type(image).__name__}: pass a path, image "
                             "bytes, a numpy array (H, W) or (H, W, 3) of uint8, or a PIL image")
    path = Path(image)
    try:
        data = path.read_bytes()
    except OSError as exc:  # the file could not be read: a client-side failure for this image only
        raise InputError(0, "unreadable_file", f"cannot read {path}: {exc.strerror or exc}") from None
    return path.name, data, mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _checked_array(array: np.ndarray) -> np.ndarray:
    """An array Pillow saves losslessly as the image the server should see, or InputError saying what fits."""
    gray = array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.dtype == np.uint8 and (gray or (array.ndim == 3 and array.shape[2] in (3, 4))):
        return np.ascontiguousarray(array)
    if array.dtype == np.uint16 and gray:  # 16-bit gray: the server scales it by its own min..max
        return np.ascontiguousarray(array)
    raise InputError(0, "unsupported_array", f"cannot send a {array.dtype} array of shape {array.shape}: pass "
                     "(H, W) or (H, W, 3) uint8 (RGB), (H, W, 4) uint8 (RGBA; the server drops alpha) or (H, W) "
                     "uint16; convert others first, e.g. (x * 255).clip(0, 255).astype(np.uint8) for floats in [0, 1]")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # lossless; level 1: the server decodes it right away
    return buffer.getvalue()


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
