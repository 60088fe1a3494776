"""The GPU figures `make bench` does not take: masks fp16 vs fp32 and nvJPEG vs Pillow, GPU memory per worker,
and torch.compile / torch-tensorrt as levers on the forward pass. Part of bench/gpu_check.sh; runs on the CPU
too (the rehearsal), where the GPU rows say so.

    python bench/gpu_extras.py --out bench/results/gpu-extras.json [--batch 32] [--size 512]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.run import VOC_CLASSES, forward_passes, unpacked  # noqa: E402


def timed_forward(segmenter, batch: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward pass of `batch`, after two warm-up passes, device synchronized (the forward
    contender's timing: bench.run.forward_passes)."""
    return float(np.median(forward_passes(segmenter, batch, repeats)[0]))


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean([(x == y).mean() for x, y in zip(a, b, strict=True)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=32, help="forward batch for the compile levers")
    parser.add_argument("--size", type=int, default=512, help="DeepLabV3 input size")
    parser.add_argument("--images", type=int, default=8, help="photos for the agreement checks")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    from bench.photo_model import fit_photo_model
    from bench.photos import photo_jpeg
    from segserve.config import ServingConfig
    from segserve.families import build_model
    from segserve.pipeline import Segmenter, pick_device
    from segserve.tools.build import build
    from segserve.tools.inprocess import Request, handle, load_handler

    cuda = torch.cuda.is_available()
    device = pick_device(0)
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}
    work = args.out.parent / "gpu-extras-work"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    weights = work / "deeplabv3.pt"
    torch.save(fit_photo_model(build_model("deeplabv3_mobilenet_v3_large", len(VOC_CLASSES))).state_dict(), weights)
    archive = build("deeplabv3", REPO / "model" / "model-config.yaml", weights, work / "store",
                    arch="deeplabv3_mobilenet_v3_large", classes=VOC_CLASSES, input_size=[args.size, args.size])
    model_dir = unpacked(archive, work)
    photos = [photo_jpeg(seed) for seed in range(args.images)]

    def masks(handler) -> list[np.ndarray]:
        import io

        from PIL import Image

        replies = handle(handler, [Request({"body": p}, {"Accept": "image/png"}) for p in photos])
        assert all(r.status == 200 for r in replies), [r.body[:200] for r in replies if r.status != 200]
        return [np.asarray(Image.open(io.BytesIO(r.body))) for r in replies]

    from segserve.tools.inprocess import read_model_yaml

    def handler_with(**runtime):
        doc = read_model_yaml(model_dir)
        doc["handler"]["runtime"] = {**(doc["handler"].get("runtime") or {}), **runtime}
        return load_handler(model_dir, gpu_id=0 if cuda else None, model_yaml_config=doc)

    # 1. agreement: fp16 vs fp32 (on the GPU; on the CPU both fp32), nvJPEG (torchvision) vs Pillow decode
    fp32 = masks(handler_with(precision="fp32", decoder="pillow"))
    fp16 = masks(handler_with(precision="auto", decoder="pillow"))
    batched = handler_with(precision="auto", decoder="torchvision")
    nvjpeg = masks(batched)
    report["agreement"] = {"fp16_vs_fp32": agreement(fp16, fp32), "nvjpeg_vs_pillow": agreement(nvjpeg, fp16),
                           "precision_auto_is": "fp16" if cuda else "fp32 (CPU)",
                           "batched_decoder": "nvJPEG" if cuda else "torchvision on the CPU"}

    # 2. GPU memory of one worker: the handler, then a full batch of photos through it
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        handle(batched, [Request({"body": photos[i % len(photos)]}, {"Accept": "image/png"})
                         for i in range(args.batch)])
        report["gpu_memory_mb"] = {"batch": args.batch,
                                   "peak_allocated": torch.cuda.max_memory_allocated() / 2**20,
                                   "peak_reserved": torch.cuda.max_memory_reserved() / 2**20}
    else:
        report["gpu_memory_mb"] = "no CUDA"

    # 3. forward levers at batch `args.batch`: eager, torch.compile, torch-tensorrt where installed
    config = ServingConfig.from_yaml(model_dir / "model-config.yaml")
    batch = torch.randn(args.batch, 3, args.size, args.size, device=device)
    levers = {}
    eager = Segmenter.from_model_dir(model_dir, config=config, device=device, warm_up=False)
    levers["eager"] = timed_forward(eager, batch, args.repeats)
    compiled = Segmenter.from_model_dir(model_dir, config=dataclasses.replace(config, compile=True), device=device,
                                        warm_up=False)
    started = time.perf_counter()
    compiled.warm_up(args.batch)
    report["compile_warm_up_s"] = time.perf_counter() - started
    levers["torch.compile"] = timed_forward(compiled, batch, args.repeats)
    try:
        import torch_tensorrt  # noqa: F401

        trt = Segmenter.from_model_dir(model_dir, config=config, device=device, warm_up=False)
        trt.model = torch.compile(trt.model, backend="tensorrt")
        levers["torch-tensorrt"] = timed_forward(trt, batch, args.repeats)
    except ImportError:
        report["torch_tensorrt"] = "not installed (its wheels are built for one torch version; this machine's " \
                                   f"torch is {torch.__version__})"
    report["forward_seconds"] = levers
    report["forward_images_per_s"] = {name: args.batch / s for name, s in levers.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
