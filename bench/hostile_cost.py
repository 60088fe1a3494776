"""What each hostile request of docs/resilience.md costs a worker: time, peak memory, and its neighbour's answer.

    python bench/hostile_cost.py                      # every case, this checkout
    python bench/hostile_cost.py --tree OTHER_CHECKOUT --cases ico,thin_png --timeout 60

Each case runs in a fresh child process that loads handler/segmenter_handler.py on model/ as a TorchServe
worker does (segserve.tools.inprocess), answers one small request to warm up, resets its peak RSS (Linux
VmHWM, via /proc/self/clear_refs), then sends one batch: the hostile request and a good one beside it, as
TorchServe's batching would. It reports the hostile request's status, the batch's wall time, the peak RSS
over the RSS before the batch, the answer's size and the good neighbour's status ("batch failed" when the
handler raised, which TorchServe answers 503 for every request of the batch). A child still running after
--timeout is killed and reported with its peak so far. `--tree` runs another checkout's code (e.g. the
commit before a fix) with this checkout's cases: the "before" column of docs/resilience.md.

Prints a table and writes bench/results/hostile_cost.json (or --out).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# The code under test: this checkout's, or in a child the --tree's (bench.hostile is always this checkout's).
sys.path.insert(0, str(Path(os.environ.get("HOSTILE_TREE", REPO)) / "src"))

from bench import hostile  # noqa: E402

Inputs = tuple[dict, dict]  # (inputs by name, request headers), as TorchServe hands them to the handler


def v2_json(image: bytes, **extra) -> dict:
    tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}
    return {"inputs": [tensor], **extra}


def v2_binary(image: bytes) -> Inputs:
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(image) + 4}}]}).encode()
    body = head + len(image).to_bytes(4, "little") + image
    headers = {"Inference-Header-Content-Length": "²", "body": {"content-type": "application/octet-stream"}}
    return {"body": body}, headers


def raw(body: bytes, **fields: str) -> Inputs:
    return {"body": body, **{k: v.encode() for k, v in fields.items()}}, {}


# name -> (what it is, a builder of its request). Builders run in the child, so big bodies are never pickled.
CASES: dict[str, tuple[str, Callable[[], Inputs]]] = {
    "baseline": ("a good 64 x 48 PNG (the neighbour itself)", lambda: raw(hostile.noise_image(64, 48))),
    "ico": ("ICO holding a 13000 x 13000 PNG (20 KB)",
            lambda: raw(hostile.ico_holding(hostile.zero_png(13000, 13000, "1")))),
    "jpeg_scans": ("progressive JPEG 2048 x 2048 with 2000 scans (57 KB)",
                   lambda: raw(hostile.many_scans_jpeg(2000))),
    "tiff_strips": ("TIFF of 400,000 strips (3.6 MB)", lambda: raw(hostile.many_strips_tiff(400_000))),
    "thin_png": ("PNG 1 x 40,000,000, tile=auto (78 KB)", lambda: raw(hostile.zero_png(1, 40_000_000))),
    "thin_png_resized": ("PNG 1 x 40,000,000, tile=off", lambda: raw(hostile.zero_png(1, 40_000_000), tile="off")),
    "wide_png": ("PNG 200,000 x 200, tile=auto (40 Mpx, 1042 windows)",
                 lambda: raw(hostile.zero_png(200_000, 200))),
    "polygons_noise": ("noise 1024 x 1024, tile=on, format=polygons",
                       lambda: raw(hostile.noise_image(1024, 1024), tile="on", format="polygons")),
    "v2_json_40mpx": ("v2 JSON tensor answer of a 6325 x 6324 image (40 Mpx, 40 KB PNG)",
                      lambda: ({"body": v2_json(hostile.zero_png(6325, 6324))}, {})),
    "overlay_9mpx": ("overlay of a 3000 x 3000 noise JPEG, tile=off",
                     lambda: raw(hostile.noise_image(3000, 3000, fmt="JPEG", quality=30), format="overlay",
                                 tile="off")),
    "form_fields": ("url-encoded form of 400,000 empty fields (3.5 MB)",
                    lambda: ({f"f{i}": b"" for i in range(400_000)}, {})),
    "echo": ("format= a 20 MB value", lambda: raw(hostile.noise_image(64, 48), format="x" * 20_000_000)),
    "v2_header_length": ("v2 binary body, Inference-Header-Content-Length: ²",
                         lambda: v2_binary(hostile.noise_image(64, 48))),
    "classes_superscript": ("classes=²", lambda: raw(hostile.noise_image(64, 48), classes="²")),
    "classes_digits": ("classes= a 5000-digit id", lambda: raw(hostile.noise_image(64, 48), classes="9" * 5000)),
    "v2_parameters": ('v2 "parameters": [1]', lambda: ({"body": v2_json(hostile.noise_image(64, 48),
                                                                            parameters=[1])}, {})),
    "v2_outputs": ('v2 "outputs": 5', lambda: ({"body": v2_json(hostile.noise_image(64, 48), outputs=5)}, {})),
    "v2_input_parameters": ('v2 input "parameters": [1]', lambda: ({"body": v2_input_parameters()}, {})),
    "tiled_1mpx": ("noise 1024 x 1024, tile=on, format=png (25 windows: the cost of one)",
                   lambda: raw(hostile.noise_image(1024, 1024), tile="on", format="png")),
}


def v2_input_parameters() -> dict:
    doc = v2_json(hostile.noise_image(64, 48))
    doc["inputs"][0]["parameters"] = [1]
    return doc


def status_of(path: str) -> dict[str, int]:
    """VmRSS and VmHWM (MiB) of a process, from /proc/<pid>/status."""
    found = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) // 1024
    return found


def child(name: str) -> None:
    """Run one case in this process and print its result as one JSON line."""
    from segserve.tools.inprocess import Request, handle, load_handler

    handler = load_handler(Path(os.environ["HOSTILE_TREE"]) / "model")
    good = Request({"body": hostile.noise_image(64, 48)})
    handle(handler, [good])
    if name in ENCODER_CASES:
        encoder_case(name)
        return
    inputs, headers = CASES[name][1]()
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = status_of("/proc/self/status")["VmRSS"]
    print(json.dumps({"ready": True, "rss": before}), flush=True)
    started = time.perf_counter()
    try:
        first, neighbour = handle(handler, [Request(inputs, headers), good])
        result = {"status": first.status, "body_bytes": len(first.body), "neighbour": str(neighbour.status),
                  "message": first.body[:160].decode("utf-8", "replace") if first.status >= 400 else ""}
    except Exception as exc:  # noqa: BLE001 - the handler raised: TorchServe fails the whole batch
        result = {"status": "batch failed", "body_bytes": 0, "neighbour": "batch failed",
                  "message": f"{type(exc).__name__}: {str(exc)[:120]}"}
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["peak_mib"] = status_of("/proc/self/status")["VmHWM"] - before
    print(json.dumps(result), flush=True)


# Cases that call an encoder directly on a mask no model would make from an image: the worst case of tracing.
ENCODER_CASES = {"lattice_polygons": "format=polygons of a 1000 x 1000 checkerboard mask (the encoder alone)"}


def encoder_case(name: str) -> None:
    import numpy as np

    from segserve import encoders
    from segserve.config import ServingConfig
    from segserve.errors import RequestError

    config = ServingConfig.from_yaml(Path(os.environ["HOSTILE_TREE"]) / "model" / "model-config.yaml")
    mask = (np.indices((1000, 1000)).sum(0) % 2).astype(np.uint8)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_of("/proc/self/status")["VmRSS"]
    print(json.dumps({"ready": True, "rss": before}), flush=True)
    started = time.perf_counter()
    try:
        body = encoders.polygons_response(mask, config)
        result = {"status": 200, "body_bytes": len(body), "message": ""}
    except RequestError as error:
        result = {"status": error.status, "body_bytes": 0, "message": error.message[:160]}
    result.update(neighbour="-", seconds=round(time.perf_counter() - started, 2),
                  peak_mib=status_of("/proc/self/status")["VmHWM"] - before)
    print(json.dumps(result), flush=True)


def run_case(name: str, tree: Path, timeout: float) -> dict:
    env = dict(os.environ, HOSTILE_TREE=str(tree))
    process = subprocess.Popen([sys.executable, __file__, "--child", name], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=env, cwd=tree)
    ready = json.loads(process.stdout.readline() or "{}")
    started = time.monotonic()
    peak = 0
    while process.poll() is None and time.monotonic() - started < timeout:
        try:
            peak = max(peak, status_of(f"/proc/{process.pid}/status")["VmHWM"] - ready.get("rss", 0))
        except (FileNotFoundError, KeyError):
            pass
        time.sleep(0.2)
    if process.poll() is None:
        process.kill()
        process.wait()
        return {"case": name, "status": "killed", "seconds": f"> {timeout:.0f}", "peak_mib": peak,
                "body_bytes": 0, "neighbour": "-", "message": f"still running after {timeout:.0f} s"}
    lines = [line for line in process.stdout.read().splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"status": f"exit {process.returncode}", "seconds": "-",
                                                  "peak_mib": peak, "body_bytes": 0, "neighbour": "-", "message": ""}
    return {"case": name, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tree", type=Path, default=REPO, help="checkout whose code runs the cases (default: this)")
    parser.add_argument("--cases", default=",".join([*CASES, *ENCODER_CASES]), help="comma-separated case names")
    parser.add_argument("--timeout", type=float, default=120, help="seconds before a case is killed")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "hostile_cost.json")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    results = []
    for name in args.cases.split(","):
        result = run_case(name, args.tree.resolve(), args.timeout)
        results.append(result)
        print(f"{name:20s} {result['status']!s:>12} {result['seconds']!s:>8} s {result['peak_mib']:>6} MiB "
              f"{result['body_bytes']:>11} B  neighbour {result['neighbour']:>12}  {result['message'][:70]}",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tree": str(args.tree), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
