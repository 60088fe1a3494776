"""The handler TorchServe runs, called in this process the way a TorchServe worker calls it.

For unit tests, the benchmark's raw contender and large-image runs, without a TorchServe process:
- `load_handler(model_dir)` imports handler/segmenter_handler.py and initializes it with a real
  `ts.context.Context` made as TorchServe's worker makes one (ts/service.py): system properties with
  model_dir, gpu_id and batch_size, the manifest, the model-config.yaml the manifest names, and a
  metrics object (`RecordedMetrics` by default, which keeps what the handler reports);
- `handle(handler, requests)` sets the batch's request ids and request headers on that context as
  the worker does, calls `handler.handle(data, context)` (ts.torch_handler.base_handler.BaseHandler.handle,
  the entry point TorchServe calls) and returns, per request, what the handler set on the context:
  status, reason phrase, content type, response headers, and the body as the worker would send it.

An exception out of `handle` (a forward pass that failed for the whole batch) is raised here; TorchServe
answers every request of such a batch 503 (507 for CUDA out of memory).
"""

from __future__ import annotations

import importlib.util
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ts
import yaml
from ts.context import Context, RequestProcessor
from ts.metrics.metric_type_enum import MetricTypes

REPO = Path(__file__).resolve().parents[3]
HANDLER = REPO / "handler" / "segmenter_handler.py"


@dataclass(frozen=True)
class Metric:
    """One observation the handler reported to TorchServe's metrics API."""

    name: str
    value: float
    unit: str
    index: int | None  # the request's slot in the batch (None: the whole batch)
    dimensions: dict[str, str]
    metric_type: MetricTypes


class RecordedMetrics:
    """Stands in for TorchServe's metrics cache (ts.metrics.metric_cache_abstract.MetricCacheAbstract):
    takes what BaseHandler.handle (add_time) and segserve.metrics.torchserve_sink (add_metric) call and
    keeps it, instead of logging the `[METRICS]` lines the frontend reads."""

    def __init__(self):
        self.records: list[Metric] = []
        self.request_ids: dict[int, str] | None = None  # set per batch, as the worker sets it

    def add_metric(self, name: str, value: float, unit: str, idx: int | None = None, dimensions: list | None = None,
                   metric_type: MetricTypes = MetricTypes.COUNTER) -> None:
        self._record(name, value, unit, idx, dimensions, metric_type)

    def add_time(self, name: str, value: float, idx: int | None = None, unit: str = "ms",
                 dimensions: list | None = None, metric_type: MetricTypes = MetricTypes.GAUGE) -> None:
        self._record(name, value, unit, idx, dimensions, metric_type)

    def _record(self, name: str, value: float, unit: str, idx: int | None, dimensions: list | None,
                metric_type: MetricTypes) -> None:
        self.records.append(Metric(name, value, unit, idx, {d.name: d.value for d in dimensions or []}, metric_type))

    def named(self, name: str, **dimensions: str) -> list[Metric]:
        """The observations of one metric, those with all the given dimension values."""
        return [m for m in self.records
                if m.name == name and all(m.dimensions.get(k) == v for k, v in dimensions.items())]


@dataclass(frozen=True)
class Request:
    """One request as TorchServe hands it to the handler."""

    inputs: dict[str, Any]  # by name: "body" (a parsed JSON body, or bytes), or multipart fields
    headers: dict[str, Any] = field(default_factory=dict)  # HTTP headers, and per input {"content-type": ...}
    id: str | None = None  # TorchServe's request id; a fresh uuid when None


@dataclass(frozen=True)
class Reply:
    """What the worker sends back for one request."""

    status: int
    phrase: str
    content_type: str | None
    headers: dict[str, str]  # every response header the handler set (content-type included)
    body: bytes


def read_model_yaml(model_dir: str | Path) -> dict[str, Any]:
    """The model-config.yaml TorchServe would read: the one the manifest names, else model-config.yaml."""
    model_dir = Path(model_dir)
    config_file = (_manifest(model_dir) or {}).get("model", {}).get("configFile", "model-config.yaml")
    return yaml.safe_load((model_dir / config_file).read_text()) or {}


def _manifest(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / "MAR-INF" / "MANIFEST.json"
    return json.loads(path.read_text()) if path.is_file() else None


def make_context(model_dir: str | Path, gpu_id: int | None = None, model_yaml_config: dict[str, Any] | None = None,
                 metrics: Any = None) -> Context:
    """A ts.context.Context for a model directory (an unpacked archive, or model/), as the worker makes it."""
    model_dir = Path(model_dir)
    model_yaml_config = model_yaml_config if model_yaml_config is not None else read_model_yaml(model_dir)
    manifest = _manifest(model_dir)
    name = (manifest or {}).get("model", {}).get("modelName") or model_dir.name
    return Context(name, str(model_dir), manifest, int(model_yaml_config.get("batchSize", 1)), gpu_id, ts.__version__,
                   metrics=metrics if metrics is not None else RecordedMetrics(), model_yaml_config=model_yaml_config)


def load_handler(model_dir: str | Path, *, gpu_id: int | None = None, model_yaml_config: dict[str, Any] | None = None,
                 metrics: Any = None, handler_file: str | Path = HANDLER):
    """segmenter_handler.py's SegmenterHandler, initialized on model_dir as a TorchServe worker does it.

    gpu_id: the GPU TorchServe would assign (None: CPU; the handler falls back to the CPU without CUDA).
    model_yaml_config: the model-config.yaml contents to use instead of model_dir's (e.g. other limits).
    metrics: what the context's metrics are (default a RecordedMetrics: `handler.context.metrics.records`).
    """
    spec = importlib.util.spec_from_file_location("segmenter_handler", handler_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler = module.SegmenterHandler()
    context = make_context(model_dir, gpu_id, model_yaml_config, metrics)
    handler.initialize(context)
    handler.context = context  # TorchServe sets it on each handle(); handle() below reads it from here
    return handler


def handle(handler, requests: Sequence[Request]) -> list[Reply]:
    """One batch through `handler.handle(data, context)`, as TorchServe's worker calls it (ts/service.py)."""
    context = handler.context
    ids = {index: request.id or str(uuid.uuid4()) for index, request in enumerate(requests)}
    context.request_ids = ids
    context.request_processor = [RequestProcessor(dict(request.headers)) for request in requests]
    if context.metrics is not None:
        context.metrics.request_ids = ids
    output = handler.handle([request.inputs for request in requests], context)
    if not isinstance(output, list) or len(output) != len(requests):
        raise RuntimeError(f"the handler answered {len(output) if isinstance(output, list) else output!r} for "
                           f"{len(requests)} requests (TorchServe would fail the batch)")
    replies = []
    for index, value in enumerate(output):
        code, phrase = context.get_response_status(index)
        replies.append(Reply(code if code is not None else 200, phrase or "", context.get_response_content_type(index),
                             dict(context.get_response_headers(index)), _body(value)))
    return replies


def _body(value: Any) -> bytes:
    """The bytes the worker sends for one returned item (ts.protocol.otf_message_handler.create_predict_response)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, indent=2).encode("utf-8")
