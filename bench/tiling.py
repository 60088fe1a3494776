"""Large images: tiled vs downscaled quality, seams, time and peak memory: `make bench-tiling`.

1. Quality: generated scenes at the default model's native scale (generate_scene draws cells
   at the same pixel size at any image size; training crops 256-px scenes without resizing),
   segmented with tile=on and tile=off (the whole image resized to the model input and the
   logits upsampled), PNG in and PNG mask out through the handler a TorchServe worker runs
   (`handler.handle`, called in-process by segserve.tools.inprocess); mIoU against the generated truth.
2. Seams: mIoU in bands of +-BAND px around every window edge vs the rest of the image.
3. Cost: for each size, a fresh child process loads the handler, then answers one request (JPEG
   bytes in, PNG mask out) through the same entry point; it reports the wall and CPU time, the RSS
   before the request (torch and the model loaded) and the peak RSS during it (Linux VmHWM, reset just
   before the request: ru_maxrss would carry the parent's peak across exec). Sizes over the default
   max_pixels run with the limits raised (model-config.yaml's), as a deployment serving them would.

Prints a table and writes bench/results/tiling.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from segserve.tiling import window_starts  # noqa: E402
from segserve.tools.inprocess import Request, handle, load_handler, read_model_yaml  # noqa: E402
from segserve.tools.scoring import class_iou, confusion_matrix  # noqa: E402
from segserve.tools.synthetic import generate_scene  # noqa: E402

BAND = 8  # px either side of a window edge
SEED_START = 50_000  # away from training (1,000,000+) and evaluation (0..199) seeds


def class_ious(mask: np.ndarray, truth: np.ndarray, where: np.ndarray | None = None) -> list[float]:
    """Per-class IoU of the default model's 3 classes (segserve.tools.scoring, as make evaluate scores)."""
    return class_iou(confusion_matrix(truth, mask, 3, where)).tolist()


def edge_bands(height: int, width: int, tile: tuple[int, int], overlap: float) -> np.ndarray:
    """True within BAND px of any window edge inside the image (the image's own border excluded)."""
    band = np.zeros((height, width), bool)
    for length, size, axis in ((height, tile[0], 0), (width, tile[1], 1)):
        for start in window_starts(length, size, overlap):
            for edge in (start, start + size):
                if 0 < edge < length:
                    if axis == 0:
                        band[max(0, edge - BAND):edge + BAND] = True
                    else:
                        band[:, max(0, edge - BAND):edge + BAND] = True
    return band


def segment(handler, data: bytes, tile: str) -> tuple[int, bytes]:
    """One request through the handler: the status and the PNG mask (or the error body)."""
    (reply,) = handle(handler, [Request({"data": data, "format": b"png", "tile": tile.encode()})])
    return reply.status, reply.body


def png_mask(handler, image: np.ndarray, tile: str) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    status, body = segment(handler, buffer.getvalue(), tile)
    assert status == 200, body[:300]
    return np.asarray(Image.open(io.BytesIO(body)))


def quality(handler, size: int, scenes: int) -> tuple[dict, list[np.ndarray]]:
    config = handler.segmenter.config
    per_scene, images = [], []
    sums = {"tiled": [], "downscaled": [], "band": [], "interior": []}
    for i in range(scenes):
        seed = SEED_START + i
        image, truth = generate_scene(seed, (size, size))
        images.append(image)
        started = time.perf_counter()
        tiled = png_mask(handler, image, "on")
        seconds = time.perf_counter() - started
        downscaled = png_mask(handler, image, "off")
        band = edge_bands(size, size, config.tile_size, config.tiling.overlap)
        row = {"seed": seed, "size": size, "tiled_seconds": round(seconds, 2)}
        for name, ious in (("tiled", class_ious(tiled, truth)), ("downscaled", class_ious(downscaled, truth)),
                           ("band", class_ious(tiled, truth, band)), ("interior", class_ious(tiled, truth, ~band))):
            row[f"{name}_iou"] = [round(v, 4) for v in ious]
            row[f"{name}_miou"] = round(float(np.nanmean(ious)), 4)
            sums[name].append(row[f"{name}_miou"])
        per_scene.append(row)
        print(f"  scene {seed} {size}x{size}: tiled mIoU {row['tiled_miou']:.4f}, "
              f"downscaled {row['downscaled_miou']:.4f}"
              f", bands {row['band_miou']:.4f} vs interior {row['interior_miou']:.4f} ({seconds:.1f} s tiled)",
              flush=True)
    summary = {f"mean_{k}_miou": round(float(np.mean(v)), 4) for k, v in sums.items()}
    summary["band_px"] = BAND
    summary["band_fraction"] = round(float(edge_bands(size, size, config.tile_size, config.tiling.overlap).mean()), 3)
    return {"scenes": per_scene, **summary}, images


def mosaic(images: list[np.ndarray], size: int) -> np.ndarray:
    """A size x size image from the quality scenes, laid side by side and repeated (content at native scale)."""
    block = np.concatenate([np.concatenate(images[i:i + 2], 1) for i in range(0, len(images) - 1, 2)], 0) \
        if len(images) >= 4 else images[0]
    reps = -(-size // block.shape[0]), -(-size // block.shape[1])
    return np.tile(block, (*reps, 1))[:size, :size]


def child(path: Path, tile: str) -> None:
    """One request in a fresh process: print JSON with seconds, RSS before it and peak RSS (MiB)."""
    doc = read_model_yaml(REPO / "model")
    doc["handler"]["limits"] = {**doc["handler"].get("limits", {}), "max_pixels": 10**9, "max_bytes": 10**9,
                                "max_windows": 10**9, "max_request_memory": 10**12}
    handler = load_handler(REPO / "model", model_yaml_config=doc)
    data = path.read_bytes()
    before = psutil.Process().memory_info().rss / 2**20  # now, with torch and the model loaded
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    cpu, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    status, body = segment(handler, data, tile)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:")) / 1024
    assert status == 200, body[:300]
    cpu_seconds = usage.ru_utime + usage.ru_stime - cpu.ru_utime - cpu.ru_stime
    print(json.dumps({"seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
                      "rss_before_mib": round(before), "peak_rss_mib": round(peak),
                      "response_bytes": len(body)}))


def cost(images: list[np.ndarray], sizes: list[int], tiles: list[str], scratch: Path) -> list[dict]:
    rows = []
    for size in sizes:
        path = scratch / f"mosaic-{size}.jpg"
        Image.fromarray(mosaic(images, size)).save(path, quality=90)
        for tile in tiles:
            out = subprocess.run([sys.executable, __file__, "--child", str(path), "--tile", tile],
                                 capture_output=True, text=True, check=True)
            row = {"size": f"{size}x{size}", "megapixels": round(size * size / 1e6, 1), "tile": tile,
                   "jpeg_bytes": path.stat().st_size, **json.loads(out.stdout.strip().splitlines()[-1])}
            row["seconds_per_megapixel"] = round(row["seconds"] / row["megapixels"], 2)
            row["peak_minus_before_mib"] = row["peak_rss_mib"] - row["rss_before_mib"]
            rows.append(row)
            print(f"  {row['size']} tile={tile}: {row['seconds']:.1f} s ({row['seconds_per_megapixel']} s/Mpx, "
                  f"{row['cpu_seconds']:.0f} CPU s), "
                  f"peak RSS {row['peak_rss_mib']} MiB ({row['rss_before_mib']} before the request)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality-size", type=int, default=2048, help="side of the generated quality scenes")
    parser.add_argument("--scenes", type=int, default=4, help="quality scenes (4 also make the cost mosaics)")
    parser.add_argument("--sizes", default="2048,4096,8192", help="image sides for time and memory")
    parser.add_argument("--tiles", default="on,off", help="tile modes measured for time and memory")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tiling.json")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tile", default="on", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.tile)
        return 0

    handler = load_handler(REPO / "model")
    config = handler.segmenter.config
    print(f"tile {config.tile_size}, overlap {config.tiling.overlap}, batch {config.tiling.batch}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    print(f"quality: {args.scenes} generated {args.quality_size}x{args.quality_size} scenes", flush=True)
    quality_result, images = quality(handler, args.quality_size, args.scenes)
    print("time and peak RSS, one request per fresh process:", flush=True)
    scratch = args.out.parent
    scratch.mkdir(parents=True, exist_ok=True)
    cost_rows = cost(images, [int(s) for s in args.sizes.split(",")], args.tiles.split(","), scratch)

    print()
    print(f"mIoU over {args.scenes} scenes {args.quality_size}x{args.quality_size}: "
          f"tiled {quality_result['mean_tiled_miou']:.4f}, downscaled {quality_result['mean_downscaled_miou']:.4f}; "
          f"tiled within {BAND} px of window edges {quality_result['mean_band_miou']:.4f} "
          f"vs elsewhere {quality_result['mean_interior_miou']:.4f}")
    print(f"{'size':>11} {'tile':>4} {'Mpx':>5} {'seconds':>8} {'s/Mpx':>6} {'CPU s':>6} {'peak RSS MiB':>13} "
          f"{'before':>7}")
    for row in cost_rows:
        print(f"{row['size']:>11} {row['tile']:>4} {row['megapixels']:>5} {row['seconds']:>8} "
              f"{row['seconds_per_megapixel']:>6} {row['cpu_seconds']:>6} {row['peak_rss_mib']:>13} "
              f"{row['rss_before_mib']:>7}")
    result = {"machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                          "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
              "tiling": {"tile_size": list(config.tile_size), "overlap": config.tiling.overlap,
                         "batch": config.tiling.batch},
              "quality": quality_result, "cost": cost_rows}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
