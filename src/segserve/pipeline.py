"""The whole request path, without TorchServe: decode -> batch forward -> masks -> bodies.

Images up to one window (or with tile=off, or under handler.tiling.auto_above_pixels)
are resized to the model's input and batched into one forward pass; larger ones go
through sliding windows at their own scale (segserve.tiling), one request at a time.

`Segmenter.handle_batch` answers every request of a batch on its own: a bad
request gets its own JSON error and never changes the answers of the good
requests batched with it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import decode, tiling
from . import encoders as encode
from . import v2 as oip
from .config import ServingConfig
from .errors import InternalError, PayloadTooLarge, RequestError
from .families import load_model
from .metrics import Metrics
from .options import Options, parse_options
from .transforms import logits_to_mask, tensor_to_model_input, to_model_input, upsample_logits

logger = logging.getLogger(__name__)


@dataclass
class Request:
    """One client request as TorchServe delivers it: its inputs by name and its HTTP headers."""

    inputs: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    id: str | None = None  # TorchServe's request id (the x-request-id response header), for the logs


@dataclass
class Response:
    status: int
    content_type: str
    body: bytes
    error_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers (v2 binary data)

    @property
    def phrase(self) -> str:
        return HTTPStatus(self.status).phrase

    @classmethod
    def from_error(cls, error: RequestError) -> Response:
        return cls(error.status, "application/json", json.dumps(error.to_dict()).encode(), error.type)


@dataclass
class Decoded:
    """A request that passed decoding: its model input and what postprocess needs to answer it."""

    index: int
    tensor: torch.Tensor | None  # the resized model input; None when tiled
    width: int
    height: int
    options: Options
    image: Image.Image | None = None  # kept for tiling and for format=overlay
    tiled: bool = False
    v2: oip.V2Request | None = None  # an Open Inference Protocol v2 request, answered in v2 form
    request_id: str | None = None
    jpeg: bytes | None = None  # waiting for the batched torchvision decode (runtime.decoder), then tensor is set
    orientation: int = 1  # the waiting JPEG's EXIF orientation


@dataclass
class Prediction:
    """The model's answer for one request: logits at the model's size (untiled), or the mask or the
    probabilities already at the image's size (tiled), or the error that stopped it."""

    logits: torch.Tensor | None = None
    mask: np.ndarray | None = None
    probs: np.ndarray | None = None
    error: RequestError | None = None


def pick_device(gpu_id: int | None) -> torch.device:
    """The GPU TorchServe assigned to this worker when CUDA is there, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


def content_types(headers: dict[str, Any]) -> dict[str, str]:
    """Per-input content types as TorchServe reports them: {"body": {"content-type": "image/png"}}."""
    return {k: v.get("content-type", "") for k, v in headers.items() if isinstance(v, dict)}


class Segmenter:
    """A loaded model with its serving config: the in-process pipeline the handler wraps."""

    def __init__(self, config: ServingConfig, model: nn.Module, device: torch.device | str = "cpu",
                 metrics: Metrics | None = None):
        self.config = config
        self.model = model
        self.device = torch.device(device)
        self.metrics = metrics or Metrics()  # stage times, images, errors (segserve.metrics); none by default
        # JPEGs for the model are decoded by torchvision in one call per batch (nvJPEG on a GPU).
        self.batch_decode = config.decoder == "torchvision" or (config.decoder == "auto" and self.device.type == "cuda")

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, config: ServingConfig | None = None,
                       device: torch.device | str = "cpu", warm_up: bool = True) -> Segmenter:
        """Load from a directory holding model-config.yaml and the weights file it names."""
        model_dir = Path(model_dir)
        config = config or ServingConfig.from_yaml(model_dir / "model-config.yaml")
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        model = load_model(config, model_dir / config.weights, device=device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if config.compile:
            # Compiled on the first forward (the warm-up) and again per new batch size: minutes of startup
            # on a small CPU, so raise startupTimeout with it. Measured slower than eager on CPU.
            model = torch.compile(model)
        segmenter = cls(config, model, device)
        if warm_up:
            segmenter.warm_up()
        return segmenter

    def warm_up(self) -> None:
        """One forward pass so the first real request doesn't pay for lazy initialisation."""
        height, width = self.config.input_size
        self.forward(torch.zeros(1, 3, height, width))

    # -- stages -----------------------------------------------------------------------------
    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return to_model_input(image, self.config.input_size, self.config.mean, self.config.std)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalized input -> (N, C, H, W) logits, one pass under inference_mode."""
        batch = batch.to(self.device, non_blocking=True)
        if self.config.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            output = self.model(batch)
            if isinstance(output, dict):  # torchvision segmentation models return {"out": ..., "aux": ...}
                output = output["out"]
            return output

    def _autocast(self):
        """Mixed precision per `runtime.precision`; float32 (no autocast) where it would not pay."""
        precision = self.config.precision
        if precision == "auto":
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def masks(self, logits: torch.Tensor, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """Logits (N, C, h, w) -> one uint8 mask per image at its (width, height)."""
        return [logits_to_mask(logits[i], height, width) for i, (width, height) in enumerate(sizes)]

    def _tiling_args(self) -> tuple:
        config = self.config
        return self.forward, config.tile_size, config.tiling.overlap, config.tiling.batch, config.mean, config.std

    def tiled_mask(self, image: Image.Image) -> np.ndarray:
        """Sliding-window mask of the whole image at its own scale (segserve.tiling)."""
        return tiling.sliding_window_mask(image, *self._tiling_args())

    def tiled_probs(self, image: Image.Image, channels: tuple[int, ...] | None = None) -> np.ndarray:
        return tiling.sliding_window_probs(image, *self._tiling_args(), channels=channels)

    def predict(self, images: list[Image.Image], tile: str = "auto") -> list[np.ndarray]:
        """RGB images -> class-index masks at each image's own size (the in-process reference path).

        `tile` as the request option: auto, on or off."""
        tiled = [tiling.should_tile(image.width, image.height, tile, self.config) for image in images]
        resized = [image for image, t in zip(images, tiled, strict=True) if not t]
        masks = iter(self.masks(self.forward(torch.stack([self.preprocess_image(image) for image in resized])),
                                [image.size for image in resized]) if resized else [])
        return [self.tiled_mask(image) if t else next(masks) for image, t in zip(images, tiled, strict=True)]

    def encode(self, prediction: Prediction, item: Decoded) -> Response:
        """One request's answer in its format, from its prediction."""
        if prediction.error is not None:
            raise prediction.error
        options, config = item.options, self.config
        if options.format == "probs" and item.v2 is None:
            return self._probs(prediction, item)
        mask = prediction.mask if prediction.mask is not None else logits_to_mask(prediction.logits, item.height,
                                                                                   item.width)
        if item.v2 is not None:
            body, content_type, headers = oip.answer(mask, item.v2, config)
            return Response(200, content_type, body, headers=headers)
        if options.format == "png":
            body = encode.mask_to_png(encode.keep_classes(mask, options.classes), config.palette)
        elif options.format == "rle":
            body = encode.rle_response(mask, config, options.classes, options.min_area)
        elif options.format == "polygons":
            body = encode.polygons_response(mask, config, options.classes, options.min_area)
        elif options.format == "overlay":
            body = encode.overlay_jpeg(item.image, encode.keep_classes(mask, options.classes), config)
        else:
            body = encode.json_response(mask, config, options.classes)
        return Response(200, options.content_type, body)

    def check_response_size(self, options: Options, width: int, height: int) -> None:
        """format=probs grows with classes x pixels: refuse it before any work when over max_response_bytes."""
        if options.format != "probs":
            return
        size = len(options.classes or range(self.config.num_classes)) * width * height * 2
        limit = self.config.limits.max_response_bytes
        if size > limit:
            raise PayloadTooLarge(
                f"format=probs for this {width}x{height} image would be {size} bytes; the limit is {limit} "
                "(max_response_bytes): ask for fewer classes (classes=...), send a smaller image, or use format=png")

    def _probs(self, prediction: Prediction, item: Decoded) -> Response:
        # The size was checked in decode_request, before any work.
        probs = prediction.probs
        if probs is None:
            channels = list(item.options.classes or range(self.config.num_classes))
            probs = upsample_logits(prediction.logits, item.height, item.width).softmax(0)[channels]
            probs = probs.to(torch.float16).cpu().numpy()
        return Response(200, "application/x-npy", encode.probs_npy(probs))

    # -- the batch, request by request ------------------------------------------------------
    def decode_request(self, index: int, request: Request) -> Decoded:
        with self.metrics.time("decode", index):
            decoded = self._decode(index, request)
        decoded.request_id = request.id
        if not decoded.tiled and decoded.jpeg is None:  # waiting JPEGs are decoded and resized as a batch
            with self.metrics.time("preprocess", index):
                decoded.tensor = self.preprocess_image(decoded.image)
            if decoded.options.format != "overlay":
                decoded.image = None  # only overlay draws over the image; let it go
        return decoded

    def _decode(self, index: int, request: Request) -> Decoded:
        """Bytes -> image and options; the model input (tensor) is left to decode_request."""
        if oip.is_v2(request.inputs, request.headers):
            v2 = oip.parse(request.inputs, request.headers, self.config)
            return Decoded(index, None, v2.image.width, v2.image.height, Options(), v2.image, v2=v2)
        options = parse_options(request.inputs, request.headers, self.config)
        data = decode.extract_image_bytes(request.inputs, content_types(request.headers))
        limits = self.config.limits
        if options.format == "overlay":  # drawn over the full-resolution image
            image = decode.decode_image(data, limits)
            width, height = image.size
        elif self.batch_decode and (jpeg := self._batch_decodable(index, data, options)) is not None:
            return jpeg
        else:  # a large JPEG may be decoded smaller, unless it is to be tiled at its own scale
            image, width, height = decode.decode_for_model(
                data, limits, self.config.input_size,
                full_if=lambda w, h: tiling.should_tile(w, h, options.tile, self.config))
        self.check_response_size(options, width, height)
        if tiling.should_tile(width, height, options.tile, self.config):
            return Decoded(index, None, width, height, options, image, tiled=True)
        return Decoded(index, None, width, height, options, image)

    def _batch_decodable(self, index: int, data: bytes, options: Options) -> Decoded | None:
        """A Decoded waiting for the batched torchvision decode, or None when Pillow should decode it:
        not a JPEG, CMYK (torchvision's colours differ), or to be tiled (tiles are cut from a PIL image)."""
        header = decode.probe(data, self.config.limits)
        if header.format != "JPEG" or header.mode not in ("RGB", "L") or \
                tiling.should_tile(header.width, header.height, options.tile, self.config):
            return None
        self.check_response_size(options, header.width, header.height)
        return Decoded(index, None, header.width, header.height, options, jpeg=data, orientation=header.orientation)

    def preprocess(self, requests: list[Request]) -> tuple[list[Decoded], dict[int, Response]]:
        """Decode every request; failures become that request's error response."""
        decoded: list[Decoded] = []
        failed: dict[int, Response] = {}
        for index, request in enumerate(requests):
            with self._request_errors(index, request, failed):
                decoded.append(self.decode_request(index, request))
        pending = [item for item in decoded if item.jpeg is not None]
        if pending:
            self._decode_jpegs(pending, requests, failed)
            decoded = [item for item in decoded if item.index not in failed]
        return decoded, failed

    @contextlib.contextmanager
    def _request_errors(self, index: int, request: Request, failed: dict[int, Response]) -> Iterator[None]:
        """A failure inside the block becomes this request's own error response; the batch goes on."""
        name = request_name(request.id, index)
        try:
            yield
        except RequestError as error:
            logger.info("request %s refused: %s %s: %s", name, error.status, error.type, error.message)
            failed[index] = self.error_response(error, request)
        except Exception:  # a bug of ours, or e.g. out of GPU memory, must not take the batch down
            logger.exception("request %s: unexpected error while decoding", name)
            failed[index] = self.error_response(InternalError("the image could not be processed"), request)

    def _decode_jpegs(self, pending: list[Decoded], requests: list[Request], failed: dict[int, Response]) -> None:
        """Batched torchvision decode of the waiting JPEGs into model inputs on the model's device.
        If the batch call fails, each image is decoded by Pillow alone; failures go into `failed`."""
        config = self.config
        try:
            with self.metrics.time("decode"):
                images = decode.decode_jpegs([item.jpeg for item in pending], [item.orientation for item in pending],
                                             self.device)
        except Exception:  # noqa: BLE001 - one bad JPEG fails torchvision's whole call: find it with Pillow
            images = [None] * len(pending)
        for item, pixels in zip(pending, images, strict=True):
            with self._request_errors(item.index, requests[item.index], failed):
                if pixels is None or tuple(pixels.shape[-2:]) != (item.height, item.width):
                    with self.metrics.time("decode", item.index):
                        pixels, _, _ = decode.decode_for_model(item.jpeg, config.limits, config.input_size)
                with self.metrics.time("preprocess", item.index):
                    item.tensor = (self.preprocess_image(pixels) if isinstance(pixels, Image.Image) else
                                   tensor_to_model_input(pixels, config.input_size, config.mean, config.std))
            item.jpeg = None

    def inference(self, decoded: list[Decoded]) -> list[Prediction]:
        """One Prediction per decoded request: resized ones in one forward pass, tiled ones one by one."""
        resized = [d for d in decoded if not d.tiled]
        logits = iter([])
        if resized:
            try:
                with self.metrics.time("forward"):
                    logits = iter(self.forward(torch.stack([d.tensor.to(self.device) for d in resized])))
            except Exception as exc:  # TorchServe fails the batch (503) and logs the traceback; name the requests
                logger.error("forward pass failed for requests %s: %s: %s",
                             ", ".join(request_name(d.request_id, d.index) for d in resized), type(exc).__name__, exc)
                for item in resized:
                    self.metrics.failed("prediction_failed", 503, item.index)
                raise
        return [self._tiled(item) if item.tiled else Prediction(logits=next(logits)) for item in decoded]

    def _tiled(self, item: Decoded) -> Prediction:
        try:
            with self.metrics.time("forward", item.index):
                if item.options.format == "probs":
                    return Prediction(probs=self.tiled_probs(item.image, item.options.classes))
                return Prediction(mask=self.tiled_mask(item.image))
        except RequestError as error:
            return Prediction(error=error)
        except Exception:  # e.g. out of memory: this request fails, the batch goes on
            logger.exception("request %s: unexpected error in tiled inference",
                             request_name(item.request_id, item.index))
            return Prediction(error=InternalError("the image could not be segmented"))

    def postprocess(self, decoded: list[Decoded], predictions: list[Prediction],
                    failed: dict[int, Response], count: int) -> list[Response]:
        """One response per request, in request order."""
        responses: dict[int, Response] = dict(failed)
        for item, prediction in zip(decoded, predictions, strict=True):
            try:
                with self.metrics.time("encode", item.index):
                    responses[item.index] = self.encode(prediction, item)
                self.metrics.answered(item.width, item.height, item.index)
            except RequestError as error:
                logger.info("request %s failed: %s %s: %s", request_name(item.request_id, item.index),
                            error.status, error.type, error.message)
                responses[item.index] = self.error_response(error, v2=item.v2)
            except Exception:
                logger.exception("request %s: unexpected error while encoding the mask",
                                 request_name(item.request_id, item.index))
                responses[item.index] = self.error_response(InternalError("the mask could not be encoded"), v2=item.v2)
        for index, response in responses.items():
            if response.status >= 400:
                self.metrics.failed(response.error_type or "unknown", response.status, index)
        return [responses[i] for i in range(count)]

    @staticmethod
    def error_response(error: RequestError, request: Request | None = None,
                       v2: oip.V2Request | None = None) -> Response:
        """The error in the request's own protocol: v2 requests get a v2 error body."""
        if v2 is None:
            try:
                v2_body = request is not None and oip.is_v2(request.inputs, request.headers)
            except Exception:  # a body that cannot even be inspected still gets its own error, not the batch's
                v2_body = False
            if not v2_body:
                return Response.from_error(error)
        request_id = v2.id if v2 is not None else oip.request_id(request.inputs, request.headers)
        return Response(error.status, "application/json", oip.error_body(error, request_id), error.type)

    def handle_batch(self, requests: list[Request]) -> list[Response]:
        decoded, failed = self.preprocess(requests)
        return self.postprocess(decoded, self.inference(decoded), failed, len(requests))


def request_name(request_id: str | None, index: int) -> str:
    """How logs name a request: TorchServe's request id (the client sees it as x-request-id), else its slot."""
    return request_id if request_id else f"#{index} of the batch"


def log_batch(responses: list[Response]) -> None:
    """One line per batch: its size and statuses (never image data)."""
    statuses = ",".join(str(r.status) for r in responses)
    logger.info("segserve batch: %d requests, statuses %s", len(responses), statuses)
