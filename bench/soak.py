"""`make soak`: a real TorchServe under mixed good and bad load, a worker killed with -9, workers scaled.

    python bench/soak.py                   # 180 s, 16 clients, 2 workers
    python bench/soak.py --duration 60     # shorter

Phases (each request is counted in the phase its answer came in):
  warm-up  load starts on the archive's 1 worker; it is scaled to --workers under load
  steady   worker RSS sampled every second: the growth from its start to its end must stay < --rss-limit %
  kill     one worker is killed with SIGKILL; TorchServe must replace it. Only the batch it had in flight may
           fail ("Worker died."), and the project's client (retries) must complete every good request
  scale    workers scaled up to --workers+1, down to 1 and back, under load: no good request may fail
Good requests (scenes from segserve.tools.synthetic in PNG/JPEG/WebP/TIFF, several response formats) go through
segserve.client.SegservClient, whose every attempt is recorded; bad ones (bench/hostile.py: corrupt,
oversized, wrong type, malformed JSON, bad options) go raw and must get their 4xx with a JSON error.
Every request has a timeout, so a hang is counted, never waited out. Loopback only.

Writes bench/results/soak.json; prints a table; exits 1 if a criterion fails. See docs/resilience.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import requests  # noqa: E402
from PIL import Image  # noqa: E402

from bench.hostile import Case, soak_bad_case  # noqa: E402
from segserve.client.api import WORKER_DIED, SegservClient, SegservError  # noqa: E402
from segserve.config import ServingConfig  # noqa: E402
from segserve.tools.build import build  # noqa: E402
from segserve.tools.server import TorchServe, free_ports  # noqa: E402
from segserve.tools.synthetic import generate_scene  # noqa: E402

MODEL = "segmenter"
MODEL_CONFIG = REPO / "model" / "model-config.yaml"
GOOD_FORMATS = ("json", "png", "rle", "polygons")


@dataclass
class Outcome:
    """One request: `status` is what the caller finally got (0: no answer); `attempts` what each try got,
    as (phase when the answer came, "status message"): a batch killed in flight fails in the kill phase
    even though its requests started before it. `phase`: when the final answer came."""

    kind: str  # good | bad
    phase: str
    started: float
    seconds: float
    status: int
    attempts: list[tuple[str, str]] = field(default_factory=list)
    problem: str | None = None

    def failed_attempts(self, phases: tuple[str, ...]) -> list[str]:
        """Attempts answered in `phases` with neither a 200 nor a 4xx (a 5xx or no answer)."""
        return [note for phase, note in self.attempts if phase in phases and not note.startswith(("200", "4"))]


class RecordingSession(requests.Session):
    """A requests session that notes every attempt the client makes: status and, for errors, the message."""

    def __init__(self, soak: Soak):
        super().__init__()
        self.soak = soak
        self.attempts: list[tuple[str, str]] = []

    def request(self, method, url, *args, **kwargs):
        try:
            response = super().request(method, url, *args, **kwargs)
        except requests.RequestException as exc:
            self.attempts.append((self.soak.phase, type(exc).__name__))
            raise
        note = str(response.status_code)
        if response.status_code != 200:
            try:
                note += f" {response.json().get('message', '')}"
            except (ValueError, AttributeError):
                note += f" {response.text[:80]}"
        self.attempts.append((self.soak.phase, note))
        return response


def good_images() -> list[bytes]:
    """Scenes at several sizes in several encodings: what a client would send."""
    images = []
    for seed, size, fmt in [(1, (256, 256), "PNG"), (2, (240, 320), "JPEG"), (3, (384, 512), "JPEG"),
                            (4, (133, 97), "PNG"), (5, (300, 300), "WEBP"), (6, (200, 260), "TIFF"),
                            (7, (480, 640), "JPEG"), (8, (256, 256), "WEBP")]:
        buffer = io.BytesIO()
        Image.fromarray(generate_scene(seed, size)[0]).save(buffer, format=fmt)
        images.append(buffer.getvalue())
    return images


class Soak:
    def __init__(self, server: TorchServe, clients: int, bad_fraction: float, seed: int, timeout: float):
        self.server, self.clients, self.bad_fraction, self.seed, self.timeout = (
            server, clients, bad_fraction, seed, timeout)
        self.phase = "warm-up"
        self.outcomes: list[Outcome] = []
        self.rss: list[dict] = []  # {"t", "phase", "workers": {pid: MiB}}
        self.events: list[dict] = []
        self.images = good_images()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.t0 = time.monotonic()

    # -- management ----------------------------------------------------------------------------------
    def describe(self) -> dict:
        response = requests.get(f"{self.server.management_url}/models/{MODEL}",
                                headers=self.server.headers("management"), timeout=30)
        response.raise_for_status()
        return response.json()[0]

    def ready_pids(self) -> list[int]:
        return [w["pid"] for w in self.describe()["workers"] if w["status"] == "READY"]

    def scale(self, workers: int) -> dict:
        started = time.monotonic()
        response = requests.put(f"{self.server.management_url}/models/{MODEL}",
                                params={"min_worker": workers, "max_worker": workers, "synchronous": "true"},
                                headers=self.server.headers("management"), timeout=300)
        ready = self.wait_workers(workers, timeout=300)
        event = {"event": f"scale to {workers}", "phase": self.phase, "at_s": round(started - self.t0, 1),
                 "status": response.status_code, "seconds": round(time.monotonic() - started, 1),
                 "ready_workers": len(ready)}
        self.events.append(event)
        return event

    def wait_workers(self, count: int, timeout: float, without: int | None = None) -> list[int]:
        """READY worker pids once there are exactly `count` (none of them `without`), or what there is at timeout."""
        deadline = time.monotonic() + timeout
        pids: list[int] = []
        while time.monotonic() < deadline:
            described = self.describe()["workers"]
            pids = [w["pid"] for w in described if w["status"] == "READY"]
            if len(described) == count and len(pids) == count and without not in pids:
                return pids
            time.sleep(0.5)
        return pids

    # -- load -----------------------------------------------------------------------------------------
    def client_loop(self, index: int) -> None:
        rng = random.Random(f"{self.seed}:{index}")
        session = RecordingSession(self)
        client = SegservClient(self.server.inference_url, token=self.server.keys()["inference"], session=session,
                               timeout=self.timeout, retries=4, backoff=0.5)
        raw = requests.Session()
        while not self._stop.is_set():
            started = time.monotonic()
            if rng.random() < self.bad_fraction:
                outcome = self.send_bad(raw, soak_bad_case(rng), started)
            else:
                outcome = self.send_good(client, session, rng, started)
            with self._lock:
                self.outcomes.append(outcome)

    def send_good(self, client: SegservClient, session: RecordingSession, rng: random.Random,
                  started: float) -> Outcome:
        session.attempts = []
        try:
            client.predict(rng.choice(self.images), format=rng.choice(GOOD_FORMATS))
            status, problem = 200, None
        except SegservError as exc:
            status, problem = exc.status, str(exc)
        return Outcome("good", self.phase, started - self.t0, time.monotonic() - started, status, session.attempts,
                       problem)

    def send_bad(self, session: requests.Session, case: Case, started: float) -> Outcome:
        try:
            response = session.post(f"{self.server.inference_url}/predictions/{MODEL}", data=case.body,
                                    headers={**self.server.headers(), **case.headers}, timeout=self.timeout)
        except requests.RequestException as exc:
            return Outcome("bad", self.phase, started - self.t0, time.monotonic() - started, 0,
                           [(self.phase, type(exc).__name__)],
                           f"{case.name}: no answer ({type(exc).__name__})")
        try:
            error = response.json()
        except ValueError:
            error = None
        message = error.get("message", "") if isinstance(error, dict) else ""
        problem = None
        if not case.allows(response.status_code):
            problem = f"{case.name}: {response.status_code} {response.text[:200]!r}"
        elif not (isinstance(error, dict) and error.get("code") == response.status_code and message):
            problem = f"{case.name}: {response.status_code} without a JSON error: {response.text[:200]!r}"
        return Outcome("bad", self.phase, started - self.t0, time.monotonic() - started, response.status_code,
                       [(self.phase, f"{response.status_code} {message}".strip())], problem)

    def sample_rss(self) -> None:
        while not self._stop.wait(1.0):
            try:
                workers = {w["pid"]: w["status"] for w in self.describe()["workers"]}
            except requests.RequestException:
                continue
            rss = {}
            for pid, status in workers.items():
                try:
                    if status == "READY":
                        rss[pid] = psutil.Process(pid).memory_info().rss / 2**20
                except psutil.NoSuchProcess:
                    pass
            self.rss.append({"t": round(time.monotonic() - self.t0, 1), "phase": self.phase, "workers": rss})

    # -- phases ---------------------------------------------------------------------------------------
    def run(self, workers: int, warmup: float, steady: float, kill_settle: float, scale_steps: list[int],
            scale_settle: float) -> None:
        threads = [threading.Thread(target=self.client_loop, args=(i,), daemon=True) for i in range(self.clients)]
        threads.append(threading.Thread(target=self.sample_rss, daemon=True))
        for thread in threads:
            thread.start()
        try:
            if len(self.ready_pids()) != workers:
                self.scale(workers)  # under load: scaling up is part of the test
            time.sleep(warmup)
            self.phase = "steady"
            self.events.append({"event": "steady", "at_s": round(time.monotonic() - self.t0, 1)})
            time.sleep(steady)
            self.phase = "kill"
            self.kill_one(workers, kill_settle)
            self.phase = "scale"
            for count in scale_steps:
                self.scale(count)
                time.sleep(scale_settle)
        finally:
            self.phase = "done"
            self._stop.set()
            for thread in threads:
                thread.join(self.timeout * 6)  # a client mid-request finishes within its retries' timeouts

    def kill_one(self, workers: int, settle: float) -> None:
        pid = max(self.ready_pids())
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        replacement = self.wait_workers(workers, timeout=180, without=pid)
        replaced = len(replacement) == workers and pid not in replacement
        self.events.append({"event": "kill -9", "pid": pid, "at_s": round(started - self.t0, 1),
                            "replaced": replaced, "replaced_after_s": round(time.monotonic() - started, 1),
                            "workers_after": replacement})
        time.sleep(settle)


# -- report ----------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def rss_growth(samples: list[dict]) -> dict:
    """Per worker alive through the steady phase: median RSS of its first and last quarter (at most 15 s each)."""
    steady = [s for s in samples if s["phase"] == "steady"]
    if len(steady) < 4:
        return {"workers": {}, "max_growth_pct": None, "note": "too few samples"}
    window = max(1, min(15, len(steady) // 4))
    first, last = steady[:window], steady[-window:]
    pids = set.intersection(*(set(s["workers"]) for s in steady))
    workers = {}
    for pid in sorted(pids):
        start = statistics.median(s["workers"][pid] for s in first)
        end = statistics.median(s["workers"][pid] for s in last)
        workers[str(pid)] = {"start_mib": round(start, 1), "end_mib": round(end, 1),
                             "peak_mib": round(max(s["workers"][pid] for s in steady), 1),
                             "growth_pct": round(100 * (end - start) / start, 2)}
    growth = max((w["growth_pct"] for w in workers.values()), default=None)
    return {"workers": workers, "max_growth_pct": growth, "window_samples": window}


def summarize(soak: Soak, batch_size: int, rss_limit: float, workers: int) -> dict:
    phases: dict[str, dict] = {}
    by_phase: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in soak.outcomes:
        by_phase[outcome.phase].append(outcome)
    for phase, outcomes in by_phase.items():
        good = [o for o in outcomes if o.kind == "good"]
        bad = [o for o in outcomes if o.kind == "bad"]
        attempts = [note for o in soak.outcomes if o.kind == "good" for when, note in o.attempts if when == phase]
        latencies = [o.seconds * 1000 for o in good if o.status == 200]
        phases[phase] = {
            "requests": len(outcomes), "good": len(good), "bad": len(bad),
            "good_final": dict(Counter(str(o.status) for o in good)),
            "good_attempts": dict(Counter(a.split(" ")[0] for a in attempts)),
            "good_failed_attempts": dict(Counter(a for a in attempts if not a.startswith("200"))),
            "good_retried": sum(len(o.attempts) > 1 for o in good),
            "bad_status": dict(Counter(str(o.status) for o in bad)),
            "p50_ms": round(percentile(latencies, 0.5) or 0, 1), "p95_ms": round(percentile(latencies, 0.95) or 0, 1),
            "max_ms": round(max(latencies, default=0), 1),
        }
    every = soak.outcomes
    kill_failures = [note for o in every for note in o.failed_attempts(("kill",))]
    died = [note for note in kill_failures if WORKER_DIED in note]
    kill = next((e for e in soak.events if e["event"] == "kill -9"), {})
    scale_events = [e for e in soak.events if e["event"].startswith("scale")]
    calm_failures = [note for o in every for note in o.failed_attempts(("warm-up", "steady"))]
    rss = rss_growth(soak.rss)
    criteria = {
        "every request answered (no timeout)": all(o.status != 0 for o in every),
        "every good request completed (client with retries)": all(o.status == 200 for o in every
                                                                    if o.kind == "good"),
        "zero 5xx in warm-up and steady": not calm_failures,
        # A bad request in a batch that a kill or a scale-down cut short got "Worker died.": counted there.
        "every bad request got its 4xx with a JSON error": all(
            o.problem is None for o in every if o.kind == "bad" and not o.failed_attempts(("kill", "scale"))),
        f"worker RSS growth < {rss_limit}% in steady": rss["max_growth_pct"] is not None
        and rss["max_growth_pct"] < rss_limit,
        "killed worker replaced": bool(kill.get("replaced")),
        f"kill: only the in-flight batch failed (<= {batch_size}, all 'Worker died.')":
            len(died) <= batch_size and len(died) == len(kill_failures),
        "scaling answered 200 with every worker ready": bool(scale_events) and all(
            e["status"] == 200 and e["ready_workers"] == int(e["event"].split()[-1]) for e in scale_events),
        "load reached every phase": all(by_phase.get(p) for p in ("warm-up", "steady", "kill", "scale")),
    }
    good = [o for o in every if o.kind == "good" and o.status == 200]
    return {
        "passed": all(criteria.values()), "criteria": criteria,
        "requests": len(every), "good": sum(o.kind == "good" for o in every),
        "bad": sum(o.kind == "bad" for o in every),
        "p50_ms": round(percentile([o.seconds * 1000 for o in good], 0.5) or 0, 1),
        "p95_ms": round(percentile([o.seconds * 1000 for o in good], 0.95) or 0, 1),
        "phases": phases, "events": soak.events, "rss": rss, "kill_casualties": kill_failures,
        "scale_casualties": [note for o in every for note in o.failed_attempts(("scale",))],
        "restarts": sum(e["event"] == "kill -9" for e in soak.events),
        "problems": [o.problem for o in every if o.problem][:50],
        "settings": {"clients": soak.clients, "bad_fraction": soak.bad_fraction, "seed": soak.seed,
                     "timeout_s": soak.timeout, "workers": workers, "batch_size": batch_size},
    }


def table(report: dict) -> str:
    lines = [f"{'phase':<8} {'requests':>8} {'good':>5} {'bad':>5} {'good final':<18} {'good failed attempts':<34} "
             f"{'bad statuses':<28} {'p50 ms':>7} {'p95 ms':>7}"]
    for phase in ("warm-up", "steady", "kill", "scale", "done"):
        row = report["phases"].get(phase)
        if not row:
            continue
        failed = ", ".join(f"{k}: {v}" for k, v in row["good_failed_attempts"].items()) or "-"
        lines.append(f"{phase:<8} {row['requests']:>8} {row['good']:>5} {row['bad']:>5} "
                     f"{json.dumps(row['good_final']):<18} {failed[:34]:<34} {json.dumps(row['bad_status'])[:28]:<28} "
                     f"{row['p50_ms']:>7} {row['p95_ms']:>7}")
    lines.append(f"all      {report['requests']:>8} {report['good']:>5} {report['bad']:>5}   "
                 f"p50 {report['p50_ms']} ms, p95 {report['p95_ms']} ms (good requests, retries included)")
    for pid, w in report["rss"]["workers"].items():
        lines.append(f"worker {pid} RSS in steady: {w['start_mib']} -> {w['end_mib']} MiB "
                     f"({w['growth_pct']:+.2f}%, peak {w['peak_mib']} MiB)")
    for event in report["events"]:
        lines.append("event: " + ", ".join(f"{k}={v}" for k, v in event.items()))
    lines.append(f"kill casualties (attempts): {report['kill_casualties'] or 'none'}")
    lines.append(f"scale casualties (attempts): {report['scale_casualties'] or 'none'}")
    for name, ok in report["criteria"].items():
        lines.append(f"{'PASS' if ok else 'FAIL'}  {name}")
    return "\n".join(lines)


def run_soak(server: TorchServe, duration: float, clients: int = 16, workers: int = 2, bad_fraction: float = 0.25,
             seed: int = 0, timeout: float = 60, rss_limit: float = 10, scale_steps: list[int] | None = None,
             batch_size: int | None = None) -> dict:
    """Soak a running server (its model `segmenter`) for about `duration` seconds; the report as a dict."""
    warmup = max(5.0, 0.1 * duration)
    kill_settle = max(3.0, 0.05 * duration)
    scale_settle = max(3.0, 0.05 * duration)
    scale_steps = scale_steps if scale_steps is not None else [workers + 1, 1, workers]
    steady = max(10.0, duration - warmup - 20 - kill_settle - len(scale_steps) * (scale_settle + 10))
    soak = Soak(server, clients, bad_fraction, seed, timeout)
    batch_size = batch_size or int(soak.describe().get("batchSize", 1))
    soak.run(workers, warmup, steady, kill_settle, scale_steps, scale_settle)
    return summarize(soak, batch_size, rss_limit, workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=180, help="seconds of load, about (default 180)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent client threads (default 16)")
    parser.add_argument("--workers", type=int, default=2, help="workers during the soak (default 2)")
    parser.add_argument("--bad-fraction", type=float, default=0.25, help="share of bad requests (default 0.25)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per request attempt (default 60)")
    parser.add_argument("--rss-limit", type=float, default=10, help="max worker RSS growth in steady, %% (10)")
    parser.add_argument("--scale-steps", default=None,
                        help="worker counts to scale to in the scale phase (default: workers+1,1,workers)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "soak.json")
    args = parser.parse_args(argv)

    config = ServingConfig.from_yaml(MODEL_CONFIG)
    with tempfile.TemporaryDirectory(prefix="segserve-soak-") as tmp:
        work = Path(tmp)
        build(MODEL, MODEL_CONFIG, REPO / "model" / config.weights, work / "model-store")
        server = TorchServe(workdir=work / "run", model_store=work / "model-store",
                            base_config=REPO / "config.properties",
                            ports=free_ports("inference", "management", "metrics", "grpc_inference",
                                             "grpc_management"),
                            models=(f"{MODEL}={MODEL}.mar",))
        server.start()
        try:
            server.wait_ready(MODEL, timeout=300)
            print(f"soak: {args.duration:.0f} s, {args.clients} clients, {args.workers} workers, "
                  f"{args.bad_fraction:.0%} bad requests, TorchServe at {server.inference_url}", flush=True)
            started = time.monotonic()
            report = run_soak(server, args.duration, args.clients, args.workers, args.bad_fraction, args.seed,
                              args.timeout, args.rss_limit,
                              [int(n) for n in args.scale_steps.split(",")] if args.scale_steps else None)
            report["wall_s"] = round(time.monotonic() - started, 1)
        finally:
            server.stop()
    report["machine"] = {"cpus": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"{'PASSED' if report['passed'] else 'FAILED'} in {report['wall_s']} s; report: {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
