"""How segserve's cost grows with the work: time and peak memory per request against image size, and
throughput, latency and worker memory against concurrent clients. `make bench-scaling`.

Image size (0.1 to 40 Mpx, the default model's max_pixels): each size runs in a fresh process holding the
archive's handler (segserve.tools.inprocess, the code a worker runs) with the default tile=auto; after a
warm-up request, one request of that size is timed `--repeats` times (median), and its peak memory is the
process's peak RSS after it less the RSS before it. The fit is of log(time) on log(pixels) below and above
the tiling threshold (handler.tiling.auto_above_pixels), where the pipeline changes: a slope of 1 is linear in
pixels.

Clients (1 to 64): one TorchServe serving the default archive on the generated 512x384 scenes of `make bench`,
`--requests` per level (at least 2 per client) after a warm-up; images/s, p50 and p99 latency, worker peak RSS.

    python bench/scaling.py                     # both, bench/results/scaling.{json,png}
    python bench/scaling.py --sizes 0.1,1,4 --clients 1,8 --requests 16
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

ASPECT = 4 / 3  # width / height of every image


def scene_jpeg(megapixels: float) -> tuple[bytes, int, int]:
    """A generated microscopy scene of about `megapixels` (4:3), tiled from one 1024x768 scene, as a JPEG."""
    from PIL import Image

    from segserve.tools.synthetic import generate_scene

    height = max(8, round((megapixels * 1e6 / ASPECT) ** 0.5))
    width = round(height * ASPECT)
    base = generate_scene(7, (768, 1024))[0]
    pixels = np.tile(base, (height // 768 + 1, width // 1024 + 1, 1))[:height, :width]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), width, height


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def one_size(megapixels: float, repeats: int) -> dict:
    """In this process: the handler, a warm-up, then the request of this size `repeats` times."""
    from segserve.tools.inprocess import Request, handle, load_handler

    handler = load_handler(REPO / "model")
    warm, _, _ = scene_jpeg(0.05)
    handle(handler, [Request({"body": warm}, {"Accept": "image/png"})])
    body, width, height = scene_jpeg(megapixels)
    before = rss_mb()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        (reply,) = handle(handler, [Request({"body": body}, {"Accept": "image/png"})])
        seconds.append(time.perf_counter() - started)
        if reply.status != 200:
            raise RuntimeError(f"{megapixels} Mpx: {reply.status} {reply.body[:300]!r}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"megapixels": width * height / 1e6, "width": width, "height": height, "jpeg_bytes": len(body),
            "seconds": float(np.median(seconds)), "all_seconds": seconds, "peak_extra_mb": peak - before,
            "tiled": width * height > handler.segmenter.config.tiling.auto_above_pixels}


def fit(points: list[dict]) -> dict | None:
    """log-log least squares: time ~ pixels^slope."""
    if len(points) < 2:
        return None
    x = np.log([p["megapixels"] for p in points])
    y = np.log([p["seconds"] for p in points])
    slope, intercept = np.polyfit(x, y, 1)
    return {"slope": float(slope), "seconds_per_mpx_at_1": float(np.exp(intercept)),
            "from_mpx": float(min(p["megapixels"] for p in points)),
            "to_mpx": float(max(p["megapixels"] for p in points))}


def sizes_part(sizes: list[float], repeats: int, bar) -> dict:
    rows = []
    for megapixels in sizes:
        bar.set_description(f"image size {megapixels} Mpx")
        result = subprocess.run([sys.executable, __file__, "--one-size", str(megapixels), "--repeats", str(repeats)],
                                capture_output=True, text=True, timeout=1800)
        if result.returncode:
            raise RuntimeError(result.stderr[-3000:])
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        bar.update()
    resized = [r for r in rows if not r["tiled"]]
    tiled = [r for r in rows if r["tiled"]]
    per_mpx = [r["seconds"] / r["megapixels"] for r in tiled]
    return {"rows": rows, "fit_resized": fit(resized), "fit_tiled": fit(tiled),
            "tiled_seconds_per_mpx": [float(min(per_mpx)), float(max(per_mpx))] if per_mpx else None,
            "peak_extra_mb_per_mpx": fit([{"megapixels": r["megapixels"], "seconds": max(r["peak_extra_mb"], 1e-3)}
                                          for r in tiled])}


def clients_part(levels: list[int], count: int, warmup: int, bar) -> list[dict]:
    from bench.run import ACCEPT, default_workload, run_http, start_server, tuned_config

    rows = []
    with tempfile.TemporaryDirectory(prefix="segserve-scaling-") as tmp:
        work = Path(tmp)
        store = work / "model-store"
        workload = default_workload(store, tuned_config(work, {}), 8)
        bar.set_description("starting TorchServe")
        server = start_server(work / "segmenter", store, (f"segmenter={workload.archive.name}",))
        try:
            run_http(server, "segmenter", workload, "segserve", 4, warmup, ACCEPT["segserve"], breakdown=False)
            for level in levels:
                bar.set_description(f"{level} clients")
                r = run_http(server, "segmenter", workload, "segserve", level, max(count, level * 2),
                             ACCEPT["segserve"])
                rows.append({"clients": level, "images_per_s": r.images_per_s, "p50_ms": r.p50_ms,
                             "p99_ms": r.p99_ms, "worker_rss_mb": r.worker_rss_mb, "errors": r.errors})
                bar.update()
        finally:
            server.stop()
    return rows


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    sizes = report.get("sizes")
    if sizes:
        rows = sizes["rows"]
        for tiled, style, label in ((False, "bo", "resized to the input (tile=auto, small)"),
                                    (True, "gs", "tiled (tile=auto, large)")):
            part = [r for r in rows if r["tiled"] == tiled]
            axes[0].plot([r["megapixels"] for r in part], [r["seconds"] for r in part], style, label=label)
            axes[1].plot([r["megapixels"] for r in part], [r["peak_extra_mb"] for r in part], style, label=label)
        for key, style in (("fit_resized", "b--"), ("fit_tiled", "g--")):
            f = sizes.get(key)
            if f:
                x = np.geomspace(f["from_mpx"], f["to_mpx"], 20)
                axes[0].plot(x, f["seconds_per_mpx_at_1"] * x ** f["slope"], style,
                             label=f"fit: time ~ pixels^{f['slope']:.2f}")
        for ax, ylabel in ((axes[0], "seconds per request"), (axes[1], "peak memory of the request (MB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("image size (megapixels)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        axes[0].set_title("time per request vs image size")
        axes[1].set_title("memory per request vs image size")
    clients = report.get("clients")
    if clients:
        x = [r["clients"] for r in clients]
        axes[2].plot(x, [r["images_per_s"] for r in clients], "g-o", label="images/s")
        axes[2].set_ylabel("images/s")
        twin = axes[2].twinx()
        twin.plot(x, [r["p50_ms"] for r in clients], "k--", label="p50 ms")
        twin.plot(x, [r["p99_ms"] for r in clients], "r:", label="p99 ms")
        twin.set_ylabel("latency (ms)")
        twin.set_yscale("log")
        axes[2].set_xscale("log", base=2)
        axes[2].set_xlabel("concurrent clients")
        axes[2].set_title("served: throughput and latency vs clients")
        axes[2].grid(alpha=0.3)
        lines = axes[2].get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        axes[2].legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.1,0.25,0.5,1,2,4,8,16,25,40", help="megapixels (empty: skip)")
    parser.add_argument("--clients", default="1,2,4,8,16,32,64", help="client counts (empty: skip)")
    parser.add_argument("--repeats", type=int, default=3, help="timed requests per image size")
    parser.add_argument("--requests", type=int, default=48, help="requests per client level (at least 2 per client)")
    parser.add_argument("--warmup", type=int, default=48)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", default="scaling")
    parser.add_argument("--one-size", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_size is not None:
        print(json.dumps(one_size(args.one_size, args.repeats)))
        return 0
    from tqdm import tqdm

    from bench.run import machine

    sizes = [float(s) for s in args.sizes.split(",") if s]
    levels = [int(c) for c in args.clients.split(",") if c]
    report = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items() if k not in ("out", "one_size")}}
    with tqdm(total=len(sizes) + len(levels), desc="scaling", unit="step") as bar:
        if sizes:
            report["sizes"] = sizes_part(sizes, args.repeats, bar)
        if levels:
            report["clients"] = clients_part(levels, args.requests, args.warmup, bar)
    if sizes:
        print(f"{'Mpx':>6} {'tiled':>5} {'s/request':>10} {'s/Mpx':>7} {'peak MB':>8}")
        for r in report["sizes"]["rows"]:
            print(f"{r['megapixels']:6.2f} {str(r['tiled']):>5} {r['seconds']:10.3f} "
                  f"{r['seconds'] / r['megapixels']:7.3f} {r['peak_extra_mb']:8.0f}")
        for key in ("fit_resized", "fit_tiled"):
            f = report["sizes"][key]
            if f:
                print(f"{key}: time ~ pixels^{f['slope']:.2f} from {f['from_mpx']:.2f} to {f['to_mpx']:.1f} Mpx")
    if levels:
        print(f"{'clients':>7} {'img/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'worker MB':>9} {'errors':>6}")
        for r in report["clients"]:
            print(f"{r['clients']:>7} {r['images_per_s']:7.2f} {r['p50_ms']:8.0f} {r['p99_ms']:8.0f} "
                  f"{r['worker_rss_mb'] or 0:9.0f} {r['errors']:>6}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    path.write_text(json.dumps(report, indent=2))
    plot(report, args.out / f"{args.name}.png")
    print(f"wrote {path} and {args.out / (args.name + '.png')}")
    errors = sum(r["errors"] for r in report.get("clients", []))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
