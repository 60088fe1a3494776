"""The request path for one batch: plan -> decode -> forward and masks -> encode.

handler/segmenter_handler.py maps TorchServe's preprocess, inference and postprocess onto
`Segmenter.prepare`, `Segmenter.infer` and `Segmenter.answer`, which pass one `Batch` along:
1. prepare: each request's Plan (segserve.plan: protocol, format, tile or resize, decoder, what the
   encoder needs), decided once from the request and its image header; then its pixels decoded as the
   plan says (Pillow per request, or torchvision for the batch's JPEGs) and, for resized plans, its
   model input;
2. infer: the resized requests in one forward pass, tiled ones through sliding windows at their own
   scale (segserve.tiling); the model's head (segserve.heads) turns logits into masks at each image's size
   (a MaskSet: labels, and per-class layers where classes overlap), or float16 class probabilities when
   its format takes them;
3. answer: post-processing (segserve.masks: smooth, fill_holes, min_area), then the format's encoder
   (segserve.formats) or the v2 answer (segserve.v2).
A bad request gets its own JSON error in its own protocol and never changes the answers of the others;
a forward pass that fails for the batch raises, so TorchServe answers the batch 503.

`Segmenter.predict` runs the same stages for decoded images and returns their masks (evaluation,
figures).
"""

from __future__ import annotations

import contextlib
import json
import logging
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import decode, formats, heads, tiling, v1, v2
from .config import ServingConfig
from .decode import ImageFile
from .errors import InternalError, RequestError, truncated
from .families import load_model
from .formats import EncoderInput
from .masks import MaskSet, postprocess
from .metrics import Metrics
from .plan import PROBS, TORCHVISION, Plan, Planner, Source
from .transforms import tensor_to_model_input, to_model_input, upsample_logits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Response:
    """One request's answer: what the handler sets on TorchServe's context for it."""

    status: int
    content_type: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)  # extra response headers (v2 binary data)
    error_type: str | None = None

    @property
    def phrase(self) -> str:
        return HTTPStatus(self.status).phrase


def error_response(error: RequestError, is_v2: bool = False, v2_id: str | None = None) -> Response:
    """The error in the request's own protocol: a v2 error body for v2 requests, else segserve's JSON error."""
    body = v2.error_body(error, v2_id) if is_v2 else json.dumps(error.to_dict()).encode()
    return Response(error.status, "application/json", body, error_type=error.type)


class Batch:
    """One batch on its way through the stages: the one owner of each request's state, by slot.

    A request has its Plan once planned; then, until it is answered, what its next stage needs:
    its JPEG waiting for the batched decode, its model input (resized plans) or its image (tiled
    plans, and plans whose answer is drawn on it), then the output inference made for it. A request
    that fails is answered with its error at once and takes no further part.
    """

    def __init__(self, size: int):
        self.size = size
        self.plans: dict[int, Plan] = {}
        self.jpegs: dict[int, ImageFile] = {}
        self.model_inputs: dict[int, torch.Tensor] = {}
        self.images: dict[int, Image.Image] = {}
        self.sources: dict[int, Any] = {}  # DICOM and NIfTI input: what the medical formats reference
        self.outputs: dict[int, np.ndarray] = {}
        self.answers: dict[int, Response] = {}
        self.errors: dict[int, RequestError] = {}
        # KServe v1 requests become a slot per instance: per request of TorchServe's batch, its slot, its
        # instances' slots, or its answer already (segserve.v1). None: no v1 request, a slot per request.
        self.groups: list[int | list[int] | Response] | None = None

    def pending(self) -> list[Plan]:
        """The planned requests not answered yet, in batch order."""
        return [plan for index, plan in sorted(self.plans.items()) if index not in self.answers]

    def fail(self, index: int, error: RequestError, response: Response) -> None:
        self.errors[index] = error
        self.answers[index] = response
        for state in (self.jpegs, self.model_inputs, self.images, self.outputs, self.sources):
            state.pop(index, None)

    def responses(self) -> list[Response]:
        return [self.answers[index] for index in range(self.size)]


@dataclass(frozen=True)
class _Stage:
    """How a stage reports a request's failure: the log's wording and the 500 message for our own bugs."""

    verb: str  # a RequestError: "request <id> refused|failed: <status> <type>: <message>"
    doing: str  # an unexpected exception: "request <id>: unexpected error <doing>" (with the traceback)
    internal: str  # what the client is told then


DECODING = _Stage("refused", "while decoding", "the image could not be processed")
INFERENCE = _Stage("failed", "in inference", "the image could not be segmented")
ENCODING = _Stage("failed", "while encoding the mask", "the mask could not be encoded")


def pick_device(gpu_id: int | None) -> torch.device:
    """The GPU TorchServe assigned to this worker when CUDA is there, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        device = torch.device(f"cuda:{int(gpu_id)}")
        # Make it the current device too: torchvision's nvJPEG decoder, cuDNN handles and any bare `.cuda()`
        # in a family's code go to the current device, which is otherwise GPU 0 in every worker.
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _is_v2(inputs: dict[str, Any], headers: dict[str, Any]) -> bool:
    try:
        return v2.is_v2(inputs, headers)
    except Exception:  # a body that cannot even be inspected still gets its own (REST) error, not the batch's
        return False


def _responder(inputs: dict[str, Any], headers: dict[str, Any], is_v2: bool) -> Callable[[RequestError], Response]:
    """Error answers for a request that may have no plan yet: a v2 body names the request's id if it can be read."""
    return lambda error: error_response(error, is_v2, v2.request_id(inputs, headers) if is_v2 else None)


class Segmenter:
    """A loaded model with its serving config, and the stages of the request path."""

    def __init__(self, config: ServingConfig, model: nn.Module, device: torch.device | str = "cpu",
                 metrics: Metrics | None = None):
        self.config = config
        self.model = model
        self.device = torch.device(device)
        self.metrics = metrics or Metrics()  # stage times, images, errors (segserve.metrics); none by default
        self.planner = Planner(config, self.device)
        self.head = heads.get(config.head)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, config: ServingConfig | None = None,
                       device: torch.device | str = "cpu", warm_up: bool = True, batch_size: int = 1) -> Segmenter:
        """Load from a directory holding model-config.yaml and the weights file it names.

        batch_size: the largest batch TorchServe will hand the worker (its batchSize), warmed up too when the
        model is compiled."""
        model_dir = Path(model_dir)
        config = config or ServingConfig.from_yaml(model_dir / "model-config.yaml")
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        model = load_model(config, model_dir / config.weights, device=device)
        if config.channels_last:
            model = model.to(memory_format=_memory_format(config))
        if config.compile:
            # Compiled on the first forward (the warm-up) and again per new batch size: minutes of startup
            # on a small CPU, so raise startupTimeout with it. Measured slower than eager on CPU.
            model = torch.compile(model)
        segmenter = cls(config, model, device)
        if warm_up:
            segmenter.warm_up(batch_size)
        return segmenter

    def warm_up(self, batch_size: int = 1) -> None:
        """A forward pass so the first real request doesn't pay for lazy initialisation. A compiled model is
        also run at `batch_size`: torch.compile specializes on the first batch size and recompiles, with the
        batch dimension dynamic, at the second, which would otherwise happen inside the first full batch."""
        sizes = (1, batch_size) if self.config.compile and batch_size > 1 else (1,)
        for size in sizes:
            self.forward(torch.zeros(size, *self.config.input_shape))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalized input -> (N, C, H, W) logits, one pass under inference_mode.

        The model is `families.load_model`'s: its family's adapter already makes the output a logits tensor."""
        batch = batch.to(self.device, non_blocking=True)
        if self.config.channels_last:
            batch = batch.contiguous(memory_format=_memory_format(self.config))
        with torch.inference_mode(), self._autocast():
            return self.model(batch)

    def _autocast(self):
        """Mixed precision per `runtime.precision`; float32 (no autocast) where it would not pay."""
        precision = self.config.precision
        if precision == "auto":
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    # -- 1. prepare: plan, decode, model input ------------------------------------------------
    def prepare(self, data: list[dict[str, Any]], headers: list[dict[str, Any]],
                request_ids: list[str | None]) -> Batch:
        """A Batch of TorchServe's requests (inputs by name, request headers, request ids), planned and decoded."""
        data, headers, request_ids, groups = self._expand_v1(data, headers, request_ids)
        batch = Batch(len(data))
        batch.groups = groups
        self.metrics.slots = None if groups is None else _slots(groups, len(data))
        for index, (inputs, request_headers, request_id) in enumerate(zip(data, headers, request_ids, strict=True)):
            is_v2 = _is_v2(inputs, request_headers)
            with self._guard(batch, index, request_id, DECODING, _responder(inputs, request_headers, is_v2)):
                self._prepare(batch, index, request_id, inputs, request_headers, is_v2)
        if batch.jpegs:
            self._decode_jpegs(batch)
        return batch

    def _expand_v1(self, data: list[dict[str, Any]], headers: list[dict[str, Any]],
                   request_ids: list[str | None]) -> tuple[list, list, list, list | None]:
        """KServe v1 requests (segserve.v1) as one request per instance, and per request of TorchServe's batch
        where its answer comes from: a slot, the slots of its instances, or its error (a malformed v1 body)."""
        bodies = [v1.v1_body(inputs) for inputs in data]  # a body sent as bytes is parsed here once
        if all(body is None for body in bodies):
            return data, headers, request_ids, None
        expanded, expanded_headers, expanded_ids, groups = [], [], [], []
        for index, (inputs, body, request_headers, request_id) in enumerate(zip(data, bodies, headers, request_ids,
                                                                                 strict=True)):
            if body is None:
                groups.append(len(expanded))
                expanded.append(inputs)
                expanded_headers.append(request_headers)
                expanded_ids.append(request_id)
                continue
            try:
                instances = v1.expand(body, self.config.limits)
            except RequestError as error:
                logger.info("request %s refused: %s %s: %s", request_name(request_id, index), error.status,
                            error.type, error.message)
                groups.append(error_response(error))
                continue
            groups.append(list(range(len(expanded), len(expanded) + len(instances))))
            expanded += instances
            # Each instance's body is segserve's JSON body, whatever Content-Type the v1 body came with.
            expanded_headers += [{**request_headers, "body": {"content-type": "application/json"}}] * len(instances)
            expanded_ids += [f"{request_id or f'#{index}'}[{k}]" for k in range(len(instances))]
        return expanded, expanded_headers, expanded_ids, groups

    def _prepare(self, batch: Batch, index: int, request_id: str | None, inputs: dict[str, Any],
                 headers: dict[str, Any], is_v2: bool) -> None:
        with self.metrics.time("decode", index):
            plan, source = self.planner.plan(index, request_id, inputs, headers, is_v2)
            batch.plans[index] = plan
            if plan.decoder == TORCHVISION:  # decoded with the batch's other JPEGs (_decode_jpegs)
                batch.jpegs[index] = source
                return
            if plan.volume:  # a 3-D model's input: the whole windowed volume, one model input
                batch.sources[index] = source
                with self.metrics.time("preprocess", plan.index):
                    batch.model_inputs[index] = self._volume_input(source.windowed())
                return
            if plan.medical is not None:
                images = source.images()
                if plan.format.needs_source is not None:
                    batch.sources[index] = source
            else:
                images = [self._decode(plan, source)]
        if plan.frames > 1:
            self._take_frames(batch, plan, images)
        else:
            self._take_image(batch, plan, images[0])

    def _decode(self, plan: Plan, source: Source) -> Image.Image:
        if isinstance(source, Image.Image):
            return source
        return source.decode(self.config.input_size if plan.reduce else None)

    def _take_image(self, batch: Batch, plan: Plan, image: Image.Image) -> None:
        """Keep what the next stages need of a decoded image: the image itself, or the model input."""
        if plan.tiled or plan.keep_image:
            batch.images[plan.index] = image
        if not plan.tiled:
            with self.metrics.time("preprocess", plan.index):
                batch.model_inputs[plan.index] = to_model_input(image, self.config.input_size, self.config.mean,
                                                                self.config.std)

    def _take_frames(self, batch: Batch, plan: Plan, images: list[Image.Image]) -> None:
        """A request of several frames (segserve.medical): one model input each, stacked (frames, 3, H, W)."""
        config = self.config
        with self.metrics.time("preprocess", plan.index):
            batch.model_inputs[plan.index] = torch.stack([to_model_input(image, config.input_size, config.mean,
                                                                         config.std) for image in images])

    def _volume_input(self, grey: np.ndarray) -> torch.Tensor:
        """uint8 (i, j, k) grey levels -> (1, in_channels, i, j, k) normalized as the first channel of an image
        is (input.mean[0], input.std[0]), repeated over the model's input channels."""
        config = self.config
        volume = (torch.from_numpy(grey).float().div_(255.0) - config.mean[0]) / config.std[0]
        return volume[None, None].expand(1, config.input_shape[0], *volume.shape)

    def _decode_jpegs(self, batch: Batch) -> None:
        """Batched torchvision decode of the waiting JPEGs into model inputs on the model's device.
        If the batch call fails, each image is decoded by Pillow alone, which names the broken one."""
        config = self.config
        waiting = sorted(batch.jpegs.items())
        try:
            with self.metrics.time("decode"):
                pixels = decode.decode_jpegs([file.data for _, file in waiting],
                                             [file.header.orientation for _, file in waiting], self.device)
        except Exception as exc:  # noqa: BLE001 - one bad JPEG fails torchvision's whole call: find it with Pillow
            # Logged and counted: a decoder broken for every batch (a driver, a library) would otherwise only
            # show as slower answers.
            logger.warning("batched JPEG decode failed for %d images (%s: %s); decoding each with Pillow",
                           len(waiting), type(exc).__name__, str(exc)[:200])
            self.metrics.decoder_fallback(len(waiting))
            pixels = [None] * len(waiting)
        for (index, file), tensor in zip(waiting, pixels, strict=True):
            plan = batch.plans[index]
            with self._guard(batch, index, plan.request_id, DECODING, self._respond(plan)):
                if tensor is None or tuple(tensor.shape[-2:]) != (plan.height, plan.width):
                    with self.metrics.time("decode", index):
                        image = self._decode(plan, file)
                    self._take_image(batch, plan, image)
                else:
                    with self.metrics.time("preprocess", index):
                        batch.model_inputs[index] = tensor_to_model_input(tensor, config.input_size, config.mean,
                                                                          config.std)
        batch.jpegs.clear()

    # -- 2. infer: forward passes, and masks or probabilities at each image's size ---------------
    def infer(self, batch: Batch) -> Batch:
        """Every pending request gets its output: resized ones from one forward pass, tiled ones one by one."""
        plans = batch.pending()
        resized = [plan for plan in plans if not plan.tiled and not plan.volume]
        for plan in plans:
            if plan.volume:
                with self._guard(batch, plan.index, plan.request_id, INFERENCE, self._respond(plan)), \
                        self.metrics.time("forward", plan.index):
                    batch.outputs[plan.index] = self._volume_output(plan, batch.model_inputs.pop(plan.index),
                                                                    batch.sources[plan.index])
        # A pass per TorchServe batch; with v1 instances (a slot each) no larger than that batch or a tiled
        # pass (tiling.batch windows), so 16 instances cost the memory of a few requests, not of 16.
        step = len(resized) if batch.groups is None else max(len(batch.groups), self.config.tiling.batch)
        for start in range(0, len(resized), max(step, 1)):
            part = resized[start:start + step]
            with self.metrics.time("forward"):
                logits = self._forward_batch(batch, part)
                for plan, rows in zip(part, logits, strict=True):
                    with self._guard(batch, plan.index, plan.request_id, INFERENCE, self._respond(plan)):
                        outputs = [self._output_from_logits(plan, row) for row in rows]
                        batch.outputs[plan.index] = outputs if plan.frames > 1 else outputs[0]
        for plan in plans:
            if plan.tiled:
                with self._guard(batch, plan.index, plan.request_id, INFERENCE, self._respond(plan)), \
                        self.metrics.time("forward", plan.index):
                    image = batch.images[plan.index] if plan.keep_image else batch.images.pop(plan.index)
                    batch.outputs[plan.index] = self._tiled_output(plan, image)
        return batch

    def _forward_batch(self, batch: Batch, plans: list[Plan]) -> tuple[torch.Tensor, ...]:
        """Each plan's logits (frames, C, h, w): one forward pass for the batch, or, with the frames of a DICOM or
        NIfTI request among them, passes of at most the batch's size or handler.tiling.batch inputs (its slices go
        through the model as a tiled image's windows do)."""
        try:
            rows = [batch.model_inputs.pop(plan.index) for plan in plans]
            rows = [row if row.dim() == 4 else row[None] for row in rows]
            counts = [row.shape[0] for row in rows]
            if all(row.device == rows[0].device for row in rows):
                inputs = torch.cat(rows)  # one copy to the device (in forward), not one per image
                if inputs.device.type == "cpu" and self.device.type == "cuda":
                    inputs = inputs.pin_memory()  # so forward's non_blocking copy is asynchronous
            else:  # nvJPEG's inputs are on the GPU already, Pillow's on the CPU
                inputs = torch.cat([row.to(self.device, non_blocking=True) for row in rows])
            del rows
            if len(inputs) == len(plans):
                logits = self.forward(inputs)
            else:
                step = max(len(plans), self.config.tiling.batch)
                logits = torch.cat([self.forward(part) for part in inputs.split(step)])
            return logits.split(counts)
        except Exception as exc:  # TorchServe fails the batch (503) and logs the traceback; name the requests
            logger.error("forward pass failed for requests %s: %s: %s",
                         ", ".join(request_name(plan.request_id, plan.index) for plan in plans),
                         type(exc).__name__, exc)
            for plan in plans:
                self.metrics.failed("prediction_failed", 503, plan.index)
            raise

    def _output_from_logits(self, plan: Plan, logits: torch.Tensor) -> MaskSet | np.ndarray:
        """(C, h, w) logits at the model's size -> the plan's output at the image's size."""
        if plan.output == PROBS:
            # float16 on a GPU: the answer is float16 anyway, and every class is upsampled to the image's size.
            dtype = torch.float16 if logits.is_cuda else torch.float32
            probs = heads.probabilities(self.head, upsample_logits(logits, plan.height, plan.width, dtype),
                                        plan.options.classes)
            return probs.to(torch.float16).cpu().numpy()
        return MaskSet.unpack(heads.decide(self.head, logits, plan.height, plan.width, plan.options.post.threshold,
                                           self.config.postprocess.ignore_label))

    def _tiled_output(self, plan: Plan, image: Image.Image) -> MaskSet | np.ndarray:
        config, head = self.config, self.head
        if plan.output == PROBS:
            def to_output(logits: torch.Tensor) -> np.ndarray:
                return heads.probabilities(head, logits, plan.options.classes).to(torch.float16).cpu().numpy()
        else:
            def to_output(logits: torch.Tensor) -> np.ndarray:
                return heads.decide(head, logits, logits.shape[1], logits.shape[2], plan.options.post.threshold,
                                    config.postprocess.ignore_label)
        output = tiling.sliding_window(image, self.forward, config.tile_size, config.tiling.overlap,
                                       config.tiling.batch, config.mean, config.std, to_output, self.device)
        return output if plan.output == PROBS else MaskSet.unpack(output)

    def _volume_output(self, plan: Plan, inputs: torch.Tensor, source: Any) -> list[np.ndarray]:
        """A 3-D model over the volume by MONAI's sliding window (Gaussian-weighted overlaps), the head deciding
        each voxel's label; answered as the per-slice labels the NIfTI encoder takes."""
        from monai.inferers import sliding_window_inference

        config = self.config
        with torch.inference_mode():  # its blending updates forward's (inference) outputs in place
            logits = sliding_window_inference(inputs, config.volume_roi, config.tiling.batch, self.forward,
                                              overlap=config.tiling.overlap, mode="gaussian",
                                              sw_device=self.device, device=torch.device("cpu"))[0]
        channels, depth, height, width = logits.shape
        # decide works on (C, h, w): the volume's voxels as one (D, H*W) plane, at its own size (no resizing).
        decided = heads.decide(self.head, logits.reshape(channels, depth, height * width).float(), depth,
                               height * width, plan.options.post.threshold, config.postprocess.ignore_label)
        labels = decided if decided.ndim == 2 else decided[0]  # an overlapping head's labels, not its layers
        return source.slices_of(labels.reshape(depth, height, width))

    # -- 3. answer: encode ----------------------------------------------------------------------
    def answer(self, batch: Batch) -> list[Response]:
        """One response per request, in batch order."""
        for plan in batch.pending():
            with self._guard(batch, plan.index, plan.request_id, ENCODING, self._respond(plan)):
                with self.metrics.time("encode", plan.index):
                    batch.answers[plan.index] = self._encode(plan, batch.outputs.pop(plan.index),
                                                             batch.images.pop(plan.index, None),
                                                             batch.sources.pop(plan.index, None))
                self.metrics.answered(plan.width, plan.height, plan.index, plan.frames)
        responses = batch.responses()
        if batch.groups is not None:  # TorchServe's requests again: a v1 request's instances put together
            responses = [self._regroup(group, responses) for group in batch.groups]
            self.metrics.slots = None  # the indices below are TorchServe's own
        # Per TorchServe request: a v1 request refused whole (a malformed body, an answer over the limit) too.
        for index, response in enumerate(responses):
            if response.status >= 400:
                self.metrics.failed(response.error_type or "unknown", response.status, index)
        return responses

    def _regroup(self, group: int | list[int] | Response, responses: list[Response]) -> Response:
        """The answer of one of TorchServe's requests: its slot's, or its v1 instances' put together."""
        if isinstance(group, Response):
            return group
        if isinstance(group, int):
            return responses[group]
        answers = [responses[slot] for slot in group]
        status, body, error_type = v1.combine([(a.status, a.content_type, a.body) for a in answers],
                                              self.config.limits)
        return Response(status, "application/json", body, error_type=error_type)

    def _encode(self, plan: Plan, output: MaskSet | np.ndarray | list, image: Image.Image | None,
                source: Any = None) -> Response:
        if isinstance(output, MaskSet):
            output = postprocess(output, plan.options.post)
        elif isinstance(output, list):  # the frames of a DICOM or NIfTI request
            output = [postprocess(item, plan.options.post) if isinstance(item, MaskSet) else item for item in output]
        if plan.v2 is not None:
            body, content_type, headers = v2.answer(output.labels, plan.v2, self.config)
            return Response(200, content_type, body, headers=headers)
        return Response(200, plan.format.content_type,
                        formats.encode(plan.format, EncoderInput(output, plan.options, self.config, image,
                                                                 source)))

    # -- in-process use ------------------------------------------------------------------------
    def predict(self, images: list[Image.Image], tile: str = "auto") -> list[np.ndarray]:
        """RGB images -> class-index masks at each image's own size, through the same stages as requests.

        `tile` as the request option: auto, on or off. Raises the first image's error, if any."""
        batch = Batch(len(images))
        self.metrics.slots = None
        for index, image in enumerate(images):
            plan = self.planner.for_image(index, image, tile)
            batch.plans[index] = plan
            self._take_image(batch, plan, image)
        self.infer(batch)
        if batch.errors:
            raise batch.errors[min(batch.errors)]
        return [postprocess(batch.outputs[index], batch.plans[index].options.post).labels
                for index in range(len(images))]

    # -- per-request failures ------------------------------------------------------------------
    @staticmethod
    def _respond(plan: Plan) -> Callable[[RequestError], Response]:
        return lambda error: error_response(error, plan.v2 is not None, plan.v2.id if plan.v2 is not None else None)

    @contextlib.contextmanager
    def _guard(self, batch: Batch, index: int, request_id: str | None, stage: _Stage,
               respond: Callable[[RequestError], Response]) -> Iterator[None]:
        """A failure inside the block becomes this request's own error answer; the batch goes on."""
        name = request_name(request_id, index)
        try:
            yield
        except RequestError as error:
            logger.info("request %s %s: %s %s: %s", name, stage.verb, error.status, error.type, error.message)
            batch.fail(index, error, _answer(error, respond))
        except Exception as exc:  # a bug of ours, or e.g. out of GPU memory, must not take the batch down
            # The traceback, cut: an exception's text may quote what the client sent.
            logger.error("request %s: unexpected error %s\n%s", name, stage.doing, truncated(
                "".join(traceback.format_exception(exc)), TRACEBACK_CHARS, keep_end=True))
            error = InternalError(stage.internal)
            error.__cause__ = exc
            batch.fail(index, error, _answer(error, respond))


def _memory_format(config: ServingConfig) -> torch.memory_format:
    """Channels last for images (NHWC), or for a 3-D model's volumes (NDHWC)."""
    return torch.channels_last_3d if config.volume_roi is not None else torch.channels_last


TRACEBACK_CHARS = 8000  # of an unexpected error's traceback in the log


def _answer(error: RequestError, respond: Callable[[RequestError], Response]) -> Response:
    """The request's error answer; segserve's plain JSON error if its own protocol's cannot be made."""
    try:
        return respond(error)
    except Exception:  # noqa: BLE001 - e.g. a v2 body too broken to name its id: still this request's own answer
        return error_response(error)


def _slots(groups: list[int | list[int] | Response], size: int) -> list[int]:
    """Per slot of an expanded batch, the index of the request of TorchServe's batch it answers (for metrics)."""
    slots = [0] * size
    for request, group in enumerate(groups):
        for slot in [group] if isinstance(group, int) else group if isinstance(group, list) else []:
            slots[slot] = request
    return slots


def request_name(request_id: str | None, index: int) -> str:
    """How logs name a request: TorchServe's request id (the client sees it as x-request-id), else its slot."""
    return request_id if request_id else f"#{index} of the batch"


def log_batch(responses: list[Response]) -> None:
    """One line per batch: its size and statuses (never image data)."""
    statuses = ",".join(str(r.status) for r in responses)
    logger.info("segserve batch: %d requests, statuses %s", len(responses), statuses)
