"""TorchServe's own levers, each alone and together, on the default U-Net: what TorchServe adds per request.

Every variant starts a fresh TorchServe with config.properties (and the archive's model-config.yaml) changed by
only that variant's keys, warms it up, then measures 1, 4 and 16 clients; the raw in-process pipeline is
measured right before each variant at the same client counts, so each figure is a ratio within the minute it was
taken (the machine's speed drifts over a run). Startup (process start to the model's worker READY) is timed too.

    python bench/levers.py                               # every variant, bench/results/levers.json
    python bench/levers.py --variants baseline,async-logging,async-logging+quiet-logs --requests 32
    python bench/levers.py --list

A variant name joined with `+` combines variants. Results: a table on stdout and bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from tqdm import tqdm  # noqa: E402

from bench.run import (  # noqa: E402
    _RAW,
    ACCEPT,
    Workload,
    default_workload,
    machine,
    run_http,
    run_raw,
    start_server,
    summarize,
    tuned_config,
)
from segserve.tools.server import TorchServe  # noqa: E402

# TorchServe's logging (its log4j2.xml, in model-server.jar) writes the frontend's debug lines for every
# request twice (ts_log.log and, through the root logger, stdout) and every line a worker prints. This one
# keeps the access log and warnings.
SHORT, LONG = "%d{ISO8601} - %m%n", "%d{ISO8601} [%-5p] %t %c - %m%n"  # TorchServe's two line layouts


def _appender(name: str, file: str, layout: str, folder: str = "LOG_LOCATION") -> str:
    where = f"${{env:{folder}:-logs}}/{file}"
    return (f'    <RollingFile name="{name}" fileName="{where}.log" filePattern="{where}.%d{{dd-MMM}}.log.gz">\n'
            f'      <PatternLayout pattern="{layout}"/>\n'
            '      <Policies><SizeBasedTriggeringPolicy size="100 MB"/><TimeBasedTriggeringPolicy/></Policies>\n'
            '    </RollingFile>\n')


QUIET_LOG4J2 = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Configuration>\n  <Appenders>\n'
    + _appender("access_log", "access_log", SHORT) + _appender("ts_log", "ts_log", LONG)
    + _appender("model_log", "model_log", LONG) + _appender("metrics", "model_metrics", SHORT, "METRICS_LOCATION")
    + """  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="info" additivity="false"><AppenderRef ref="access_log"/></Logger>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Logger name="MODEL_LOG" level="warn" additivity="false"><AppenderRef ref="model_log"/></Logger>
    <Logger name="MODEL_METRICS" level="warn" additivity="false"><AppenderRef ref="metrics"/></Logger>
    <Logger name="TS_METRICS" level="warn" additivity="false"><AppenderRef ref="metrics"/></Logger>
    <Logger name="org.pytorch.serve" level="info" additivity="false"><AppenderRef ref="ts_log"/></Logger>
    <Root level="warn"><AppenderRef ref="ts_log"/></Root>
  </Loggers>
</Configuration>
""")


@dataclass(frozen=True)
class Variant:
    """One lever: config.properties keys, model-config.yaml keys (TorchServe's, or handler.runtime.threads as
    `threads`), JVM options (config.properties' vmargs) and the client protocol."""

    properties: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    jvm: tuple = ()
    protocol: str = "http"
    quiet_logs: bool = False
    note: str = ""


VARIANTS = {
    "baseline": Variant(note="config.properties and model-config.yaml as shipped"),
    "netty-1": Variant({"number_of_netty_threads": "1", "netty_client_threads": "1"},
                       note="one frontend and one backend netty thread (default: one per core each)"),
    "netty-4": Variant({"number_of_netty_threads": "4", "netty_client_threads": "4"}, note="four of each"),
    "async-logging": Variant({"async_logging": "true"}, note="log4j writes off the request threads"),
    "quiet-logs": Variant(quiet_logs=True,
                          note="log4j2 at info/warn instead of TorchServe's debug, no duplicate stdout copy"),
    "metrics-off": Variant({"disable_system_metrics": "true", "metrics_mode": "log"},
                           note="no system-metrics collector process; metrics to the log, not Prometheus"),
    "serial-gc": Variant(jvm=("-XX:+UseSerialGC",), note="the JVM's serial collector instead of G1"),
    "heap-512m": Variant(jvm=("-Xms512m", "-Xmx512m"), note="a fixed 512 MB heap (default: 1/4 of RAM)"),
    "c1-only": Variant(jvm=("-XX:TieredStopAtLevel=1",), note="client compiler only: less JIT work, "
                                                              "simpler code"),
    # Class-data sharing (Java 17: -XX:ArchiveClassesAtExit, then -XX:SharedArchiveFile) is not among them:
    # the JVM refuses to dump an archive when the class path holds a non-empty directory, and TorchServe's
    # launcher puts "." (its working directory: config, logs, keys) first on it.
    "queue-16": Variant({"job_queue_size": "16"}, note="job queue 16 instead of 200"),
    "workers-2x1": Variant(model={"minWorkers": 2, "maxWorkers": 2, "threads": 1},
                           note="2 workers x 1 intra-op thread instead of 1 x all cores"),
    "threads-1": Variant(model={"threads": 1}, note="1 worker x 1 intra-op thread"),
    "grpc": Variant(protocol="grpc", note="TorchServe's gRPC inference API instead of HTTP"),
}


def combine(name: str) -> Variant:
    parts = name.split("+")
    unknown = [p for p in parts if p not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {', '.join(unknown)}: see --list")
    merged = Variant()
    for part in parts:
        v = VARIANTS[part]
        merged = Variant({**merged.properties, **v.properties}, {**merged.model, **v.model}, merged.jvm + v.jvm,
                         v.protocol if v.protocol != "http" else merged.protocol, merged.quiet_logs or v.quiet_logs,
                         " + ".join(filter(None, [merged.note, v.note])))
    return merged


@dataclass
class Row:
    variant: str
    concurrency: int
    images_per_s: float
    p50_ms: float
    raw_images_per_s: float
    raw_p50_ms: float
    errors: int
    startup_s: float
    vs_raw: float = 0.0
    p50_vs_raw: float = 0.0
    samples: dict = field(default_factory=dict)


# -- gRPC ---------------------------------------------------------------------------------------
def grpc_stubs(work: Path):
    """TorchServe's inference.proto (in model-server.jar) compiled with grpcio-tools into `work`."""
    import importlib

    import ts
    from grpc_tools import protoc

    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    protos = work / "proto"
    with zipfile.ZipFile(jar) as archive:
        for member in ("proto/inference.proto", "google/rpc/status.proto"):
            target = protos / member.removeprefix("proto/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(member))
    include = Path(protoc.__file__).parent / "_proto"
    out = work / "grpc_out"
    out.mkdir(exist_ok=True)
    code = protoc.main(["protoc", f"-I{protos}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
                        str(protos / "inference.proto"), str(protos / "google/rpc/status.proto")])
    if code:
        raise RuntimeError("protoc failed on TorchServe's inference.proto")
    sys.path.insert(0, str(out))
    return importlib.import_module("inference_pb2"), importlib.import_module("inference_pb2_grpc")


def run_grpc(server: TorchServe, model: str, workload: Workload, concurrency: int, count: int, stubs) -> dict:
    """Like bench.run.run_http, over gRPC: one channel per client thread, the image as the `body` input and
    format=png beside it."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    pb2, pb2_grpc = stubs
    target = f"{server.host}:{server.ports['grpc_inference']}"
    # TorchServe hands a handler no gRPC metadata but the token: options travel in the input map, as form fields.
    metadata = (("authorization", server.headers("inference")["Authorization"]),)
    local = threading.local()

    def one(index: int) -> tuple[float, int, int]:
        stub = getattr(local, "stub", None)
        if stub is None:
            channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 100 * 2**20)])
            stub = local.stub = pb2_grpc.InferenceAPIsServiceStub(channel)
        image = workload.images[index % len(workload.images)]
        started = time.perf_counter()
        try:
            reply = stub.Predictions(pb2.PredictionsRequest(model_name=model, input={"body": image, "format": b"png"}),
                                     metadata=metadata, timeout=300)
            return time.perf_counter() - started, len(reply.prediction), 200
        except grpc.RpcError as error:
            return time.perf_counter() - started, 0, error.code().value[0]

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency * 2)))
        started = time.perf_counter()
        answers = list(pool.map(one, range(count)))
        seconds = time.perf_counter() - started
    errors = sum(status != 200 for _, _, status in answers)
    return summarize(workload.name, "segserve-grpc", concurrency, [a[0] for a in answers], seconds,
                     [a[1] for a in answers], None, errors)


# -- one variant ----------------------------------------------------------------------------------
def start(variant: Variant, work: Path, store: Path, model: str, archive: Path) -> tuple[TorchServe, float]:
    work.mkdir(parents=True, exist_ok=True)
    properties = dict(variant.properties)
    jvm = list(variant.jvm)
    if variant.quiet_logs:
        (work / "log4j2.xml").write_text(QUIET_LOG4J2)
        jvm.append(f"-Dlog4j.configurationFile=file://{work / 'log4j2.xml'}")
    if jvm:
        properties["vmargs"] = " ".join(jvm)
    started = time.perf_counter()
    server = start_server(work, store, (f"{model}={archive.name}",), extra_properties=tuple(properties.items()),
                          workers=int(variant.model.get("minWorkers", 1)))
    return server, time.perf_counter() - started


def archive_for(variant: Variant, work: Path, base: Workload) -> Path:
    """The default archive, rebuilt with the variant's model-config.yaml keys where it has any."""
    if not variant.model:
        return base.archive
    from segserve.config import ServingConfig
    from segserve.tools.build import build

    work.mkdir(parents=True, exist_ok=True)
    config_path = tuned_config(work, variant.model)
    config = ServingConfig.from_yaml(config_path)
    variant_store = work / "store"
    return build("segmenter", config_path, REPO / "model" / config.weights, variant_store)


def measure(name: str, variant: Variant, workload: Workload, work: Path, levels: list[int], count: int, warmup: int,
            stubs, bar) -> list[Row]:
    raw = {}
    for level in levels:  # the ceiling, right before this variant, at each client count
        bar.set_description(f"{name}: raw x{level}")
        raw[level] = run_raw(workload, work, level, count)
    archive = archive_for(variant, work / name, workload)
    bar.set_description(f"{name}: starting TorchServe")
    server, startup = start(variant, work / name, archive.parent, "segmenter", archive)
    rows = []
    try:
        bar.set_description(f"{name}: warm-up")
        send(server, workload, variant, 4, warmup, stubs, breakdown=False)
        same = same_as_http(server, workload, stubs) if variant.protocol == "grpc" else None
        for level in levels:
            bar.set_description(f"{name}: x{level}")
            result = send(server, workload, variant, level, count, stubs)
            rows.append(Row(name, level, result.images_per_s, result.p50_ms, raw[level].images_per_s,
                            raw[level].p50_ms, result.errors, startup,
                            result.images_per_s / raw[level].images_per_s, result.p50_ms / raw[level].p50_ms,
                            {"grpc_answers_equal_http": same} if same is not None else {}))
            bar.update()
    finally:
        server.stop()
    return rows


def same_as_http(server: TorchServe, workload: Workload, stubs) -> str:
    """Each image once over gRPC and once over HTTP: how many PNG masks are the same bytes ("n/m")."""
    import grpc
    import requests

    pb2, pb2_grpc = stubs
    stub = pb2_grpc.InferenceAPIsServiceStub(grpc.insecure_channel(f"{server.host}:{server.ports['grpc_inference']}"))
    metadata = (("authorization", server.headers("inference")["Authorization"]),)
    url = f"{server.inference_url}/predictions/segmenter"
    headers = {**server.headers("inference"), "Content-Type": workload.content_type, "Accept": "image/png"}
    equal = 0
    for image in workload.images:
        request = pb2.PredictionsRequest(model_name="segmenter", input={"body": image, "format": b"png"})
        reply = stub.Predictions(request, metadata=metadata, timeout=300)
        equal += reply.prediction == requests.post(url, data=image, headers=headers, timeout=300).content
    return f"{equal}/{len(workload.images)}"


def send(server: TorchServe, workload: Workload, variant: Variant, level: int, count: int, stubs,
         breakdown: bool = True):
    if variant.protocol == "grpc":
        return run_grpc(server, "segmenter", workload, level, count, stubs)
    return run_http(server, "segmenter", workload, "segserve", level, count, ACCEPT["segserve"], breakdown)


def table(rows: list[Row], levels: list[int]) -> str:
    by_variant: dict[str, list[Row]] = {}
    for row in rows:
        by_variant.setdefault(row.variant, []).append(row)
    head = " ".join(f"{'x' + str(level) + ' vs raw':>11}" for level in levels)
    lines = [f"{'variant':<34} {head} {'p50/raw x1':>10} {'vs base':>8} {'startup s':>9} {'errors':>6}"]
    base = {r.concurrency: r.vs_raw for r in by_variant.get("baseline", [])}
    for variant, vrows in by_variant.items():
        cells = " ".join(f"{r.vs_raw:10.2f}x" for r in sorted(vrows, key=lambda r: r.concurrency))
        single = next((r.p50_vs_raw for r in vrows if r.concurrency == 1), float("nan"))
        against = [r.vs_raw / base[r.concurrency] for r in vrows if base.get(r.concurrency)]
        vs_base = f"{statistics.geometric_mean(against):7.2f}x" if against else f"{'-':>8}"
        lines.append(f"{variant:<34} {cells} {single:9.2f}x {vs_base} {vrows[0].startup_s:9.1f} "
                     f"{sum(r.errors for r in vrows):>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated; join with + to combine (default: each lever alone)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=48, help="requests per level")
    parser.add_argument("--warmup", type=int, default=48, help="requests each server answers before it is measured")
    parser.add_argument("--rounds", type=int, default=1, help="run the variant list this many times, interleaved")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", default="levers")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, variant in VARIANTS.items():
            print(f"{name:<14} {variant.note}")
        return 0
    names = args.variants.split(",")
    variants = {name: combine(name) for name in names}
    levels = [int(c) for c in args.concurrency.split(",")]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="segserve-levers-") as tmp:
        work = Path(tmp)
        store = work / "model-store"
        workload = default_workload(store, tuned_config(work, {}), args.images)
        stubs = grpc_stubs(work) if any(v.protocol == "grpc" for v in variants.values()) else None
        bar = tqdm(total=len(names) * len(levels) * args.rounds, desc="levers", unit="level")
        try:
            for _ in range(args.rounds):
                for name in names:
                    rows += measure(name, variants[name], workload, work, levels, args.requests, args.warmup,
                                    stubs, bar)
        finally:
            bar.close()
            _RAW.clear()
    if args.rounds > 1:  # the median of the rounds, per variant and level
        merged = {}
        for row in rows:
            merged.setdefault((row.variant, row.concurrency), []).append(row)
        rows = []
        for (variant, level), group in merged.items():
            rows.append(Row(variant, level, statistics.median(r.images_per_s for r in group),
                            statistics.median(r.p50_ms for r in group),
                            statistics.median(r.raw_images_per_s for r in group),
                            statistics.median(r.raw_p50_ms for r in group), sum(r.errors for r in group),
                            statistics.median(r.startup_s for r in group),
                            statistics.median(r.vs_raw for r in group), statistics.median(r.p50_vs_raw for r in group),
                            {"vs_raw": [r.vs_raw for r in group]}))
    print()
    print(table(rows, levels))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    path.write_text(json.dumps({"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()
                                                               if k != "out"},
                                "variants": {n: asdict(v) for n, v in variants.items()},
                                "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"\nwrote {path}")
    return 1 if any(r.errors for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
