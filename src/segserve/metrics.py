"""segserve's own Prometheus metrics: time per stage, images and pixels served, errors by type.

The pipeline reports to a `Metrics` object; what it reports goes to a sink, a callable
`sink(name, value, kind, labels, index)`. In TorchServe the handler passes `torchserve_sink(context.metrics)`,
which hands each observation to TorchServe's metrics API; the frontend then serves them on the
metrics port (8082) next to its own (config.properties: metrics_mode=prometheus,
model_metrics_auto_detect=true). Without a sink (Segmenter.predict, the CLI) nothing is recorded.

Series, each also labelled ModelName, Level and Hostname by TorchServe:
- segserve_stage_seconds{stage=decode|preprocess|forward|encode}: histogram. decode, preprocess and
  encode are observed once per request; forward once per batch (one pass for the batch's resized images,
  and their masks or probabilities at each image's size) and once per tiled image (its windows, blended
  into its mask or probabilities). Failed requests are timed too.
- segserve_images_total, segserve_pixels_total: counters of images answered with 200 and their pixels (a multi-frame
  DICOM or a NIfTI volume is one image whose pixels are all its frames' or slices').
- segserve_errors_total{type=..., status=...}: counter of refused or failed requests by error type.
- segserve_decoder_fallbacks_total: counter of JPEGs the batched decoder (nvJPEG on a GPU) failed on as a
  batch, each then decoded by Pillow. One bad JPEG in a batch adds the batch's size; a steady rise with no
  400s means the batched decoder itself is broken.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

STAGES = ("decode", "preprocess", "forward", "encode")
STAGE_SECONDS = "segserve_stage_seconds"
IMAGES = "segserve_images_total"
PIXELS = "segserve_pixels_total"
ERRORS = "segserve_errors_total"
DECODER_FALLBACKS = "segserve_decoder_fallbacks_total"

# name, value, kind ("counter" or "histogram"), labels, index of the request in its batch (or None)
Sink = Callable[[str, float, str, dict[str, str], "int | None"], None]


class Metrics:
    """What the pipeline reports; a failing sink is logged once and never fails a request."""

    def __init__(self, sink: Sink | None = None):
        self.sink = sink
        self._warned = False
        # Per slot of the batch being served, the index of its request in TorchServe's batch, where they differ
        # (a KServe v1 request is a slot per instance: segserve.pipeline); None: the same.
        self.slots: list[int] | None = None

    def _emit(self, name: str, value: float, kind: str, labels: dict[str, str], index: int | None = None) -> None:
        if self.sink is None:
            return
        if index is not None and self.slots is not None:
            index = self.slots[index]
        try:
            self.sink(name, value, kind, labels, index)
        except Exception:  # metrics are a side channel: a broken one must not cost an answer
            if not self._warned:
                logger.exception("segserve metrics: recording %s failed (further failures are not logged)", name)
                self._warned = True

    @contextlib.contextmanager
    def time(self, stage: str, index: int | None = None) -> Iterator[None]:
        """Observe the seconds the block takes as segserve_stage_seconds{stage=...}, also when it raises."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._emit(STAGE_SECONDS, time.perf_counter() - start, "histogram", {"stage": stage}, index)

    def answered(self, width: int, height: int, index: int | None = None, frames: int = 1) -> None:
        self._emit(IMAGES, 1, "counter", {}, index)
        self._emit(PIXELS, width * height * frames, "counter", {}, index)

    def failed(self, error_type: str, status: int, index: int | None = None) -> None:
        self._emit(ERRORS, 1, "counter", {"type": error_type, "status": str(status)}, index)

    def decoder_fallback(self, images: int) -> None:
        self._emit(DECODER_FALLBACKS, images, "counter", {})


def torchserve_sink(recorder) -> Sink:
    """A sink onto TorchServe's `context.metrics` (ts.metrics MetricCacheAbstract.add_metric)."""
    from ts.metrics.dimension import Dimension
    from ts.metrics.metric_type_enum import MetricTypes

    kinds = {"counter": MetricTypes.COUNTER, "histogram": MetricTypes.HISTOGRAM}
    units = {"counter": "count", "histogram": "s"}

    def sink(name: str, value: float, kind: str, labels: dict[str, str], index: int | None) -> None:
        # A fresh list each call: add_metric appends ModelName and Level to the list it is given.
        dimensions = [Dimension(key, value) for key, value in labels.items()]
        recorder.add_metric(name, value, units[kind], idx=index, dimensions=dimensions, metric_type=kinds[kind])

    return sink
