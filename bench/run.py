"""`make bench`: raw in-process pipeline vs segserve over HTTP vs TorchServe's stock image_segmenter.

One run, same images, same concurrency levels; ratios are taken within the run, so they hold on the
machine that ran them. Results: bench/results/<name>.json and .png, and a table on stdout.

    python bench/run.py                       # CPU: default model + lraspp_mobilenet_v3_large
    python bench/run.py --quick               # a smoke run (a few requests per level)
    python bench/run.py --workloads lraspp --concurrency 1,4,16 --requests 64
    python bench/run.py --batch-size 32 --batch-delay 10    # with CUDA: deeplabv3_mobilenet_v3_large, 512 px
    python bench/run.py --workloads smp-unet,segformer      # the model families: smp U-Net, SegFormer-b0

Contenders:
  forward   the model alone: forward passes of ready-made input batches of the same size (GPU default)
  raw       the served archive's handler on its own model and config, called in a loop in this process the
            way a worker calls it (`handler.handle`, segserve.tools.inprocess) with batches of
            min(clients, batchSize): the same code a TorchServe worker runs, no HTTP, no frontend
  segserve  TorchServe + our handler, PNG masks (`Accept: image/png`), N concurrent HTTP clients
  stock     TorchServe's built-in `image_segmenter` handler on the same architecture and weights
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.photos import photo_jpeg  # noqa: E402
from segserve.config import ServingConfig  # noqa: E402
from segserve.metrics import STAGES  # noqa: E402
from segserve.tools.build import ARCHIVER, build  # noqa: E402
from segserve.tools.inprocess import Request, handle, load_handler  # noqa: E402
from segserve.tools.server import TorchServe, free_ports, stop_process_group  # noqa: E402
from segserve.tools.synthetic import generate_scene  # noqa: E402

MODEL_CONFIG = REPO / "model" / "model-config.yaml"
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]
STOCK_MODEL_FILE = '''
import torch
from torchvision.models.segmentation import {builder}
from torchvision.models.segmentation.{module} import {cls}


class StockModel({cls}):
    """torchvision's {builder}, 21 classes: TorchServe's model-file recipe needs a no-argument class."""

    def __init__(self):
        torch.nn.Module.__init__(self)
        self.__dict__.update({builder}(weights=None, weights_backbone=None, num_classes=21).__dict__)
'''
# The photo workloads: torchvision architectures on 1280x960 JPEG photos, against TorchServe's own handler.
PHOTO_ARCHS = {"lraspp": ("lraspp_mobilenet_v3_large", "lraspp", "LRASPP"),
               "deeplabv3": ("deeplabv3_mobilenet_v3_large", "deeplabv3", "DeepLabV3")}
# The model-family workloads, on the same photos: a segmentation_models_pytorch U-Net with a ResNet-34 encoder
# and a Hugging Face SegFormer-b0 (SegformerConfig's defaults are b0's sizes), 21 classes. Stock TorchServe
# serves them through a model file whose forward returns {"out": logits}, the dict its image_segmenter reads.
FAMILY_WORKLOADS = ("smp-unet", "segformer")
STOCK_SMP_UNET = '''
import segmentation_models_pytorch as smp


class StockModel(smp.Unet):
    """smp's U-Net (resnet34 encoder, 21 classes) as TorchServe's image_segmenter reads it: {"out": logits}."""

    def __init__(self):
        super().__init__(encoder_name="resnet34", encoder_weights=None, classes=21)

    def forward(self, x):
        return {"out": super().forward(x)}
'''
STOCK_SEGFORMER = '''
import json

from transformers import SegformerConfig, SegformerForSemanticSegmentation

CONFIG = json.loads({config!r})


class StockModel(SegformerForSemanticSegmentation):
    """SegFormer-b0 (21 classes) as TorchServe's image_segmenter reads it: {{"out": logits}} (at 1/4 of its input)."""

    def __init__(self):
        super().__init__(SegformerConfig.from_dict(CONFIG))

    def forward(self, x):
        return {{"out": super().forward(pixel_values=x).logits}}
'''


@dataclass
class Workload:
    """One model and the images it is benchmarked on."""

    name: str
    images: list[bytes]
    content_type: str
    archive: Path
    stock_archive: Path | None = None
    description: str = ""


@dataclass
class Result:
    workload: str
    contender: str
    concurrency: int
    requests: int
    seconds: float
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    response_bytes: float
    worker_rss_mb: float | None
    errors: int = 0
    notes: dict = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def summarize(workload: str, contender: str, concurrency: int, latencies: list[float], seconds: float,
              sizes: list[int], rss: float | None, errors: int) -> Result:
    ms = [s * 1000 for s in latencies]
    return Result(workload, contender, concurrency, len(latencies), seconds, len(latencies) / seconds,
                  percentile(ms, 50), percentile(ms, 95), percentile(ms, 99),
                  statistics.fmean(sizes) if sizes else 0.0, rss, errors)


# -- the workloads ------------------------------------------------------------------------------
def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def tuned_config(work: Path, overrides: dict) -> Path:
    """model/model-config.yaml with TorchServe's worker/batching keys and handler.runtime overridden."""
    import yaml

    doc = yaml.safe_load(MODEL_CONFIG.read_text())
    for key in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay"):
        if overrides.get(key) is not None:
            doc[key] = overrides[key]
    if overrides.get("threads") is not None:
        doc["handler"].setdefault("runtime", {})["threads"] = overrides["threads"]
    path = work / "model-config.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def default_workload(store: Path, config_path: Path, count: int) -> Workload:
    config = ServingConfig.from_yaml(config_path)
    archive = build("segmenter", config_path, REPO / "model" / config.weights, store)
    images = [png_bytes(generate_scene(5_000_000 + i, (384, 512))[0]) for i in range(count)]
    return Workload("segmenter", images, "image/png", archive,
                    description="default U-Net (256 px input), generated 512x384 microscopy scenes, PNG")


def photo_workload(name: str, store: Path, work: Path, config_path: Path, count: int, size: int) -> Workload:
    """A torchvision architecture (21 VOC classes; random backbone, head fitted in seconds to generated
    photos: bench/photo_model.py) on generated 1280x960 JPEG photos."""
    from bench.photo_model import fit_photo_model
    from segserve.families import build_model

    builder = PHOTO_ARCHS[name][0]
    torch.manual_seed(0)
    weights = work / f"{name}.pt"
    print(f"fitting the {builder} head to generated photos (so its masks show a few classes, as a trained "
          f"model's do) ...", flush=True)
    torch.save(fit_photo_model(build_model(builder, len(VOC_CLASSES))).state_dict(), weights)
    archive = build(name, config_path, weights, store, arch=builder, classes=VOC_CLASSES, input_size=[size, size])
    images = [photo_jpeg(seed) for seed in range(count)]
    return Workload(name, images, "image/jpeg", archive,
                    stock_archive=stock_archive(name, store, work, config_path, weights),
                    description=f"{builder} (21 classes, {size} px input), 1280x960 JPEG photos")


def family_workload(name: str, store: Path, work: Path, config_path: Path, count: int, size: int) -> Workload:
    """smp-unet or segformer (21 VOC classes, random weights with the classifier fitted in seconds to generated
    photos: bench/photo_model.py) on the 1280x960 JPEG photos, built as a user builds them."""
    import yaml

    from bench.photo_model import fit_classifier
    from segserve.families import build_model

    # Photos are segmented whole, resized to the input, as the torchvision photo workloads are (tile=auto would cut
    # a 1280x960 photo into windows at the smp family's defaults, which suit images at a fixed scale).
    doc = yaml.safe_load(config_path.read_text())
    max_pixels = ServingConfig.from_dict(doc["handler"]).limits.max_pixels
    doc["handler"]["tiling"] = {**(doc["handler"].get("tiling") or {}), "auto_above_pixels": max_pixels}
    config_path = work / f"{name}-config.yaml"
    config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    torch.manual_seed(0)
    weights = work / f"{name}.pt"
    print(f"fitting the {name} classifier to generated photos ...", flush=True)
    if name == "smp-unet":
        model = build_model("smp:Unet", len(VOC_CLASSES), encoder_name="resnet34")
        fit_classifier(model, model.segmentation_head[0], model)
        torch.save(model.state_dict(), weights)
        archive = build(name, config_path, weights, store, arch="smp:Unet", arch_params={"encoder_name": "resnet34"},
                        classes=VOC_CLASSES, input_size=[size, size])
        stock_model, description = STOCK_SMP_UNET, "smp U-Net, resnet34 encoder"
    else:
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        config = SegformerConfig(id2label=dict(enumerate(VOC_CLASSES)),
                                 label2id={label: i for i, label in enumerate(VOC_CLASSES)})
        model = SegformerForSemanticSegmentation(config)
        fit_classifier(model, model.decode_head.classifier, lambda x: model(pixel_values=x).logits)
        model.save_pretrained(work / "segformer-b0")  # what a fine-tuned SegFormer is shipped as
        torch.save(model.state_dict(), weights)  # the stock recipe's --serialized-file
        archive = build(name, config_path, work / "segformer-b0", store, input_size=[size, size])
        stock_model = STOCK_SEGFORMER.format(config=config.to_json_string())
        description = "Hugging Face SegFormer-b0 (its logits at 1/4 of the input)"
    images = [photo_jpeg(seed) for seed in range(count)]
    return Workload(name, images, "image/jpeg", archive,
                    stock_archive=stock_archive(name, store, work, config_path, weights, stock_model),
                    description=f"{description} (21 classes, {size} px input), 1280x960 JPEG photos")


def stock_archive(name: str, store: Path, work: Path, config_path: Path, weights: Path,
                  source: str | None = None) -> Path:
    """TorchServe's own recipe: --model-file + --serialized-file + --handler image_segmenter."""
    if source is None:
        builder, module, cls = PHOTO_ARCHS[name]
        source = STOCK_MODEL_FILE.format(builder=builder, module=module, cls=cls)
    model_file = work / f"stock_{name}" / "stock_model.py"
    model_file.parent.mkdir()
    model_file.write_text(source)
    # Same workers, batching and timeouts as ours (TorchServe's keys, before `handler:`): only the handler differs.
    config = work / "stock-config.yaml"
    ours = config_path.read_text().split("\nhandler:")[0]
    config.write_text(ours)
    command = [*ARCHIVER, "--model-name", f"stock-{name}", "--version", "1.0", "--model-file", str(model_file),
               "--serialized-file", str(weights), "--handler", "image_segmenter", "--export-path", str(store),
               "--config-file", str(config), "--force"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return store / f"stock-{name}.mar"


# -- contenders ---------------------------------------------------------------------------------
def run_raw(workload: Workload, work: Path, concurrency: int, count: int, accept: str = "image/png") -> Result:
    """The ceiling: the archive's model and code in this process, batches as TorchServe would form them
    (on the GPU where there is one, as a served worker would be)."""
    handler, served_batch = load_raw(workload, work)
    batch_size = min(concurrency, served_batch)
    headers = {"Accept": accept, "body": {"content-type": workload.content_type}}
    requests_ = [Request(inputs={"body": workload.images[i % len(workload.images)]}, headers=headers)
                 for i in range(count)]
    handle(handler, requests_[:batch_size])  # warm-up
    latencies, sizes, errors = [], [], 0
    started = time.perf_counter()
    for start in range(0, count, batch_size):
        batch_started = time.perf_counter()
        responses = handle(handler, requests_[start:start + batch_size])  # ends with masks on the CPU
        elapsed = time.perf_counter() - batch_started
        for response in responses:
            latencies.append(elapsed)
            sizes.append(len(response.body))
            errors += response.status != 200
    seconds = time.perf_counter() - started
    rss = psutil.Process().memory_info().rss / 2**20
    return summarize(workload.name, "raw", concurrency, latencies, seconds, sizes, rss, errors)


def run_forward(workload: Workload, work: Path, concurrency: int, count: int) -> Result:
    """The model alone: forward passes on ready-made input batches on the device, no decode, mask or encode."""
    handler, served_batch = load_raw(workload, work)
    segmenter = handler.segmenter
    batch_size = min(concurrency, served_batch)
    height, width = segmenter.config.input_size
    batch = torch.randn(batch_size, 3, height, width, device=segmenter.device)
    passes, seconds = forward_passes(segmenter, batch, len(range(0, count, batch_size)))
    latencies = [elapsed for elapsed in passes for _ in range(batch_size)]
    return summarize(workload.name, "forward", concurrency, latencies, seconds, [], None, 0)


def forward_passes(segmenter, batch: torch.Tensor, passes: int) -> tuple[list[float], float]:
    """Seconds of each of `passes` forward passes of `batch` (the device synchronized after each), after two
    warm-up passes (kernels, autotuning), and seconds of all of them."""
    for _ in range(2):
        segmenter.forward(batch)
    synchronize(segmenter.device)
    times = []
    started = time.perf_counter()
    for _ in range(passes):
        batch_started = time.perf_counter()
        segmenter.forward(batch)
        synchronize(segmenter.device)
        times.append(time.perf_counter() - batch_started)
    return times, time.perf_counter() - started


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_RAW: dict[str, tuple[object, int]] = {}
GPU_ID = 0 if torch.cuda.is_available() else None  # as TorchServe assigns a worker its GPU
DEFAULT_THREADS = torch.get_num_threads()


def load_raw(workload: Workload, work: Path) -> tuple[object, int]:
    """The archive's handler, initialized on the unpacked archive as a worker does, and the batch size
    TorchServe would use for it."""
    if workload.name not in _RAW:
        handler = load_handler(unpacked(workload.archive, work), gpu_id=GPU_ID)
        _RAW[workload.name] = handler, int(handler.context.system_properties["batch_size"])
        # The ceiling is one process using every core, whatever a served worker is tuned to.
        torch.set_num_threads(DEFAULT_THREADS)
    return _RAW[workload.name]


@functools.cache
def unpacked(archive: Path, work: Path) -> Path:
    """`archive` unpacked into work/unpacked-<its stem> as TorchServe unpacks it for a worker, once: the raw and
    LitServe contenders (and gpu_extras.py) read the same folder."""
    target = work / f"unpacked-{archive.stem}"
    with zipfile.ZipFile(archive) as contents:
        contents.extractall(target)
    return target


class WorkerMemory:
    """Peak RSS of a server's Python workers (the descendants whose command line holds `match`; every descendant
    where it is None), sampled every 50 ms while a level runs."""

    def __init__(self, server_pid: int, match: str | None = "model_service_worker"):
        self.server_pid = server_pid
        self.match = match
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _workers(self) -> list[psutil.Process]:
        try:
            children = psutil.Process(self.server_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [p for p in children if self.match is None or self.match in " ".join(p.cmdline())]

    def _sample(self) -> None:
        workers = self._workers()
        while not self._stop.is_set():
            for worker in workers:
                try:
                    self.peak = max(self.peak, worker.memory_info().rss / 2**20)
                except psutil.NoSuchProcess:
                    pass
            self._stop.wait(0.05)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_http(server: TorchServe | LitServe, model: str, workload: Workload, contender: str, concurrency: int,
             count: int, headers: dict[str, str], breakdown: bool = True) -> Result:
    """`count` requests from `concurrency` client threads (one keep-alive session each), after a warm-up.

    breakdown: from TorchServe, where the time went (notes["time_ms"]: the metrics port scraped before and after,
    a second's wait for the last metric lines); False for a warm-up, whose result is not kept."""
    multipart = isinstance(server, LitServe)  # LitServe reads a form, not a raw body (bench/litserve_app.py)
    if multipart:
        url, worker_pid, worker_match = server.predict_url, server.process.pid, None
    else:
        url = f"{server.inference_url}/predictions/{model}"
        headers = {**server.headers("inference"), "Content-Type": workload.content_type, **headers}
        worker_pid = int(server.pid_file.read_text().strip()) if server.pid_file.is_file() else os.getpid()
        worker_match = "model_service_worker"
    local = threading.local()

    def one(index: int) -> tuple[float, int, int]:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        image = workload.images[index % len(workload.images)]
        started = time.perf_counter()
        if multipart:
            response = session.post(url, files={"image": ("image", image, workload.content_type)}, headers=headers,
                                    timeout=300)
        else:
            response = session.post(url, data=image, headers=headers, timeout=300)
        return time.perf_counter() - started, len(response.content), response.status_code

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency * 2)))  # warm-up: connections, worker caches
        before = scrape(server) if breakdown and not multipart else None
        with WorkerMemory(worker_pid, worker_match) as memory:
            started = time.perf_counter()
            answers = list(pool.map(one, range(count)))
            seconds = time.perf_counter() - started
    errors = sum(status != 200 for _, _, status in answers)
    result = summarize(workload.name, contender, concurrency, [a[0] for a in answers], seconds,
                       [a[1] for a in answers], memory.peak or None, errors)
    if before is not None:
        time.sleep(1)  # the frontend reads the worker's metric lines asynchronously
        client_ms = statistics.fmean(a[0] for a in answers) * 1000
        result.notes["time_ms"] = time_breakdown(before, scrape(server), count, client_ms)
    return result


def scrape(server: TorchServe) -> dict[tuple[str, frozenset], float]:
    """TorchServe's metrics port (Prometheus text), as {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = requests.get(f"{server.metrics_url}/metrics", timeout=30).text
    except requests.RequestException:
        return {}
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def time_breakdown(before: dict, after: dict, count: int, client: float) -> dict | None:
    """Where a request's time went, from the counters' change over one level (ms, means).

    client: what the client measured (its mean latency, given); torchserve: the frontend's ts_inference_latency
    (request in to answer out); queue: its ts_queue_latency (waiting for a worker); worker: segserve_stage_seconds
    of the batch a request rode in (decode, preprocess and encode of every request in it, and its forward pass:
    what the request waits for in the worker); ipc_and_frontend: torchserve - queue - worker (batch assembly,
    the socket to the worker and back, the frontend's own handling); http: client - torchserve (HTTP, netty,
    the client). None without the metrics (metrics_mode=log)."""
    def delta(name: str, **labels: str) -> float:
        return sum(v - before.get(key, 0.0) for key, v in after.items()
                   if key[0] == name and all((k, w) in key[1] for k, w in labels.items()))

    inference = delta("ts_inference_latency_microseconds_total") / 1000
    batches = delta("segserve_stage_seconds_count", stage="forward")
    if not inference or not batches:
        return None
    worker = sum(delta("segserve_stage_seconds_sum", stage=stage) for stage in STAGES) * 1000 / batches
    torchserve = inference / count
    queue = delta("ts_queue_latency_microseconds_total") / 1000 / count
    return {"client": client, "http": client - torchserve, "torchserve": torchserve, "queue": queue,
            "worker": worker, "ipc_and_frontend": torchserve - queue - worker, "batch_size": count / batches}


class LitServe:
    """bench/litserve_app.py in a subprocess on a free port: the same archive's handler inside LitServe."""

    def __init__(self, workload: Workload, work: Path, workers: int | None):
        import importlib.util

        if importlib.util.find_spec("litserve") is None:
            raise SystemExit("the litserve contender needs LitServe: pip install -e '.[bench]' (or leave it out: "
                             "--contenders raw,segserve,stock)")
        self.model_dir = unpacked(workload.archive, work)
        self.port = free_ports("litserve")["litserve"]
        command = [sys.executable, str(REPO / "bench" / "litserve_app.py"), "--model-dir", str(self.model_dir),
                   "--port", str(self.port)] + (["--workers", str(workers)] if workers else [])
        self.log = work / f"litserve-{workload.name}.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def predict_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/predict"

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"LitServe exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"LitServe not ready after {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        stop_process_group(self.process.pid)


def same_answers(servers: dict, workload: Workload) -> dict:
    """Each distinct image once through segserve and once through LitServe: are the PNG masks the same bytes?"""
    segserve, litserve = servers["segserve"], servers["litserve"]
    url = f"{segserve.inference_url}/predictions/{workload.name}"
    headers = {**segserve.headers("inference"), "Content-Type": workload.content_type, "Accept": "image/png"}
    equal = 0
    for image in workload.images:
        ours = requests.post(url, data=image, headers=headers, timeout=300)
        theirs = requests.post(litserve.predict_url, files={"image": ("image", image, workload.content_type)},
                               timeout=300)
        equal += ours.status_code == theirs.status_code == 200 and ours.content == theirs.content
    return {"images": len(workload.images), "equal": equal}


def start_server(work: Path, store: Path, models: tuple[str, ...],
                 extra_properties: tuple[tuple[str, str], ...] = (), workers: int = 1) -> TorchServe:
    """TorchServe on free ports with config.properties (and `extra_properties`), returned once each registered
    model has `workers` READY workers."""
    server = TorchServe(workdir=work / "run", model_store=store, base_config=REPO / "config.properties",
                        ports=free_ports("inference", "management", "metrics", "grpc_inference", "grpc_management"),
                        models=models, extra_properties=extra_properties)
    server.start()
    for model in server.registered_models():
        server.wait_ready(model, timeout=300, workers=workers)
    return server


# -- report -------------------------------------------------------------------------------------
def table(results: list[Result]) -> str:
    lines = [f"{'workload':<10} {'contender':<9} {'clients':>7} {'img/s':>7} {'p50 ms':>8} {'p95 ms':>8} "
             f"{'p99 ms':>8} {'resp kB':>9} {'worker MB':>9} {'errors':>6}"]
    for r in results:
        rss = f"{r.worker_rss_mb:9.0f}" if r.worker_rss_mb else f"{'-':>9}"
        lines.append(f"{r.workload:<10} {r.contender:<9} {r.concurrency:>7} {r.images_per_s:7.2f} {r.p50_ms:8.1f} "
                     f"{r.p95_ms:8.1f} {r.p99_ms:8.1f} {r.response_bytes / 1000:9.1f} {rss} {r.errors:>6}")
    return "\n".join(lines)


def ratios(results: list[Result]) -> list[dict]:
    """segserve against raw and stock, level by level, within this run."""
    index = {(r.workload, r.contender, r.concurrency): r for r in results}
    rows = []
    for r in results:
        if r.contender != "segserve":
            continue
        raw = index.get((r.workload, "raw", r.concurrency))
        raw1 = index.get((r.workload, "raw", 1))
        stock = index.get((r.workload, "stock", r.concurrency))
        litserve = index.get((r.workload, "litserve", r.concurrency))
        forward = index.get((r.workload, "forward", r.concurrency))
        rows.append({
            "workload": r.workload, "concurrency": r.concurrency,
            "throughput_vs_raw": r.images_per_s / raw.images_per_s if raw else None,
            "throughput_vs_stock": r.images_per_s / stock.images_per_s if stock else None,
            "throughput_vs_forward": r.images_per_s / forward.images_per_s if forward else None,
            "throughput_vs_litserve": r.images_per_s / litserve.images_per_s if litserve else None,
            "bytes_vs_stock": r.response_bytes / stock.response_bytes if stock else None,
            "p50_vs_raw_single": r.p50_ms / raw1.p50_ms if raw1 and r.concurrency == 1 else None,
        })
    return rows


def ratio_table(rows: list[dict]) -> str:
    def fmt(value, pct=False):
        if value is None:
            return f"{'-':>10}"
        return f"{value * 100:9.2f}%" if pct else f"{value:9.2f}x"

    lines = [f"{'workload':<10} {'clients':>7} {'vs raw':>10} {'vs stock':>10} {'vs forward':>10} "
             f"{'vs litserve':>11} {'bytes/stock':>11} {'p50/raw(1)':>10}"]
    for row in rows:
        lines.append(f"{row['workload']:<10} {row['concurrency']:>7} {fmt(row['throughput_vs_raw'])} "
                     f"{fmt(row['throughput_vs_stock'])} {fmt(row['throughput_vs_forward'])} "
                     f"{fmt(row['throughput_vs_litserve']):>11} "
                     f"{fmt(row['bytes_vs_stock'], pct=True):>11} {fmt(row['p50_vs_raw_single'])}")
    return "\n".join(lines)


def breakdown_table(results: list[Result]) -> str:
    """segserve's time per request by where it went (time_breakdown), level by level."""
    keys = ("client", "http", "torchserve", "queue", "worker", "ipc_and_frontend")
    lines = ["segserve, where a request's time went (mean ms; worker = the batch it rode in):",
             f"{'workload':<10} {'clients':>7} " + " ".join(f"{k:>16}" for k in keys) + f" {'batch':>6}"]
    for r in results:
        split = r.notes.get("time_ms") if r.contender == "segserve" else None
        if split:
            lines.append(f"{r.workload:<10} {r.concurrency:>7} " + " ".join(f"{split[k]:16.1f}" for k in keys)
                         + f" {split['batch_size']:6.1f}")
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted({r.workload for r in results})
    fig, axes = plt.subplots(2, len(workloads), figsize=(5.5 * len(workloads), 7), squeeze=False)
    for column, workload in enumerate(workloads):
        for contender, style in (("forward", "b:"), ("raw", "k--"), ("segserve", "g-o"), ("litserve", "m-^"),
                                 ("stock", "r-s")):
            rows = sorted((r for r in results if r.workload == workload and r.contender == contender),
                          key=lambda r: r.concurrency)
            if not rows:
                continue
            clients = [r.concurrency for r in rows]
            axes[0][column].plot(clients, [r.images_per_s for r in rows], style, label=contender)
            axes[1][column].plot(clients, [r.p50_ms for r in rows], style, label=f"{contender} p50")
        axes[0][column].set_title(workload)
        axes[0][column].set_ylabel("images/s")
        axes[1][column].set_ylabel("p50 latency (ms)")
        axes[1][column].set_xlabel("concurrent clients")
        for ax in axes[:, column]:
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# -- main -------------------------------------------------------------------------------------
ACCEPT = {"segserve": {"Accept": "image/png"}, "litserve": {}, "stock": {}}  # stock answers JSON only; litserve PNG
CONTENDERS = ("forward", "raw", "segserve", "litserve", "stock")


def main(argv: list[str] | None = None) -> int:
    gpu = GPU_ID is not None
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="deeplabv3" if gpu else "segmenter,lraspp",
                        help="segmenter, lraspp, deeplabv3, smp-unet, segformer (comma-separated; default "
                             "segmenter,lraspp, GPU: deeplabv3)")
    parser.add_argument("--contenders", default="forward,raw,segserve,litserve,stock" if gpu
                        else "raw,segserve,litserve,stock",
                        help="forward, raw, segserve, litserve, stock (default raw,segserve,litserve,stock; GPU: all)")
    parser.add_argument("--concurrency", default=None,
                        help="client counts, comma-separated (default 1,4,16; on a GPU 1,16,64)")
    parser.add_argument("--requests", type=int, default=None, help="requests per level (default 48)")
    parser.add_argument("--images", type=int, default=8, help="distinct images per workload")
    parser.add_argument("--lraspp-size", type=int, default=520, help="LR-ASPP input size (px)")
    parser.add_argument("--deeplabv3-size", type=int, default=512, help="DeepLabV3 input size (px)")
    parser.add_argument("--family-size", type=int, default=512, help="smp-unet and segformer input size (px)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="requests each server answers before it is measured (default 48, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 images, 6 requests per level, clients 1,4")
    parser.add_argument("--workers", type=int, default=None, help="TorchServe workers (default: model-config's)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads per worker (0 = torch's)")
    parser.add_argument("--batch-size", type=int, default=None, help="TorchServe batchSize (default: model-config's)")
    parser.add_argument("--batch-delay", type=int, default=None, help="TorchServe maxBatchDelay ms")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results folder")
    parser.add_argument("--name", default="gpu" if gpu else "cpu",
                        help="results file stem (default: cpu, or gpu where CUDA is)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images = 2
    args.requests = args.requests or (6 if args.quick else 48)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 48)
    args.concurrency = args.concurrency or ("1,4" if args.quick else "1,16,64" if gpu else "1,4,16")
    levels = [int(c) for c in args.concurrency.split(",")]
    contenders = args.contenders.split(",")
    names = args.workloads.split(",")
    unknown = (set(names) - {"segmenter", *PHOTO_ARCHS, *FAMILY_WORKLOADS}
               | set(contenders) - set(CONTENDERS))
    if unknown:
        parser.error(f"unknown workload or contender: {', '.join(sorted(unknown))}")

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="segserve-bench-") as tmp:
        work = Path(tmp)
        store = work / "model-store"
        print("building archives ...", flush=True)
        config_path = tuned_config(work, {"minWorkers": args.workers, "maxWorkers": args.workers,
                                          "batchSize": args.batch_size, "maxBatchDelay": args.batch_delay,
                                          "threads": args.threads})
        config_text = config_path.read_text()  # the served archives' TorchServe settings, for the report
        workloads = []
        if "segmenter" in names:
            workloads.append(default_workload(store, config_path, args.images))
        sizes = {"lraspp": args.lraspp_size, "deeplabv3": args.deeplabv3_size}
        workloads += [photo_workload(name, store, work, config_path, args.images, sizes[name])
                      for name in PHOTO_ARCHS if name in names]
        workloads += [family_workload(name, store, work, config_path, args.images, args.family_size)
                      for name in FAMILY_WORKLOADS if name in names]
        plan = [(w, c, level) for w in workloads for c in contenders for level in levels
                if c != "stock" or w.stock_archive]
        bar = tqdm(total=len(plan), desc="benchmark", unit="level")
        servers: dict[str, TorchServe | LitServe] = {}
        agreement: dict[str, dict] = {}
        try:
            for workload in workloads:
                # Both servers up, then every contender level by level, back to back: on a shared machine
                # the speed drifts over minutes, and interleaving keeps each level's ratios within seconds.
                # An idle TorchServe costs the others nothing measurable (raw p50 75 vs 74 ms beside one).
                served = {c: (f"stock-{workload.name}" if c == "stock" else workload.name,
                              workload.stock_archive if c == "stock" else workload.archive)
                          for c in contenders if c == "segserve" or (c == "stock" and workload.stock_archive)}
                if "litserve" in contenders:
                    bar.set_description("starting LitServe")
                    servers["litserve"] = LitServe(workload, work, args.workers)
                    servers["litserve"].wait_ready()
                    served["litserve"] = (workload.name, workload.archive)
                for contender, (model, archive) in served.items():
                    if contender != "litserve":
                        bar.set_description(f"starting TorchServe ({model})")
                        servers[contender] = start_server(work / model, store, (f"{model}={archive.name}",))
                    # Measure a warm server, as one in service is: the JVM compiles the frontend's request path
                    # over its first requests, and on 2 cores that compiling slows a fresh server's first
                    # level (seen: 33 ms of frontend CPU per request after 4 requests, 19 ms after 80).
                    bar.set_description(f"warming up {model}")
                    run_http(servers[contender], model, workload, contender, 4, args.warmup, ACCEPT[contender],
                             breakdown=False)
                if "segserve" in servers and "litserve" in servers:
                    agreement[workload.name] = same_answers(servers, workload)
                for level in levels:
                    for contender in contenders:
                        if contender == "stock" and not workload.stock_archive:
                            continue
                        bar.set_description(f"{workload.name} {contender} x{level}")
                        if contender == "raw":
                            result = run_raw(workload, work, level, args.requests)
                        elif contender == "forward":
                            result = run_forward(workload, work, level, args.requests)
                        else:
                            result = run_http(servers[contender], served[contender][0], workload, contender, level,
                                              args.requests, ACCEPT[contender])
                        results.append(result)
                        bar.update()
                for server in servers.values():
                    server.stop()
                servers.clear()
                _RAW.pop(workload.name, None)
        finally:
            bar.close()
            for server in servers.values():
                server.stop()

    order = [w.name for w in workloads]
    results.sort(key=lambda r: (order.index(r.workload), contenders.index(r.contender), r.concurrency))
    rows = ratios(results)
    print()
    for workload in workloads:
        print(f"{workload.name}: {workload.description}")
    print(table(results))
    print()
    print("segserve, as a ratio within this run:")
    print(ratio_table(rows))
    print()
    print(breakdown_table(results))
    for name, agreed in agreement.items():
        print(f"{name}: LitServe's PNG masks equal segserve's on {agreed['equal']}/{agreed['images']} images")
    args.out.mkdir(parents=True, exist_ok=True)
    recorded = {k: str(v.resolve().relative_to(REPO) if isinstance(v, Path) and v.resolve().is_relative_to(REPO) else v)
                for k, v in vars(args).items()}  # no machine path in a report that may be committed
    import yaml

    served = yaml.safe_load(config_text)
    settings = {key: served.get(key) for key in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay")}
    settings["threads"] = (served["handler"].get("runtime") or {}).get("threads", 0)  # 0: torch's default
    report = {"machine": machine(), "args": recorded, "settings": settings,
              "workloads": {w.name: w.description for w in workloads},
              "results": [asdict(r) for r in results], "ratios": rows, "litserve_agreement": agreement}
    json_path = args.out / f"{args.name}.json"
    json_path.write_text(json.dumps(report, indent=2))
    plot(results, args.out / f"{args.name}.png")
    print(f"\nwrote {json_path} and {args.out / (args.name + '.png')}")
    failed = sum(r.errors for r in results if r.contender != "stock")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
