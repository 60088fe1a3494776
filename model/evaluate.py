"""Per-class IoU and mIoU of the default model on held-out generated scenes: `make evaluate`.

Predictions go through the serving pipeline (segserve.pipeline.Segmenter), so
the figures are those of what the server answers. Held-out scenes use seeds
from 0 upward; training uses seeds from 1,000,000.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(MODEL_DIR.parent / "src"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from segserve.config import ServingConfig  # noqa: E402
from segserve.families import load_model  # noqa: E402
from segserve.pipeline import Segmenter  # noqa: E402
from segserve.tools.scoring import class_iou, confusion_matrix, pixel_accuracy  # noqa: E402
from segserve.tools.synthetic import generate_scene  # noqa: E402


def evaluate(segmenter: Segmenter, seeds: range, size: tuple[int, int], batch: int = 16) -> dict:
    classes = segmenter.config.num_classes
    matrix = np.zeros((classes, classes), np.int64)
    seeds = list(seeds)
    for start in tqdm(range(0, len(seeds), batch), desc="evaluating", unit="batch"):
        scenes = [generate_scene(seed, size) for seed in seeds[start:start + batch]]
        masks = segmenter.predict([Image.fromarray(image) for image, _ in scenes])
        for (_, truth), mask in zip(scenes, masks, strict=True):
            matrix += confusion_matrix(truth, mask, classes)
    iou = class_iou(matrix)
    return {
        "images": len(seeds),
        "size": list(size),
        "iou": {name: round(float(v), 4) for name, v in zip(segmenter.config.class_names, iou, strict=True)},
        "miou": round(float(np.nanmean(iou)), 4),
        "pixel_accuracy": round(pixel_accuracy(matrix), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=MODEL_DIR / "model-config.yaml")
    parser.add_argument("--weights", type=Path, default=MODEL_DIR / "segmenter.safetensors")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed-start", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the metrics here")
    args = parser.parse_args(argv)

    config = ServingConfig.from_yaml(args.config)
    segmenter = Segmenter(config, load_model(config, args.weights))
    metrics = evaluate(segmenter, range(args.seed_start, args.seed_start + args.count), config.input_size)
    print(f"\n{metrics['images']} held-out scenes, {metrics['size'][1]}x{metrics['size'][0]}")
    print(f"{'class':<12} IoU")
    for name, value in metrics["iou"].items():
        print(f"{name:<12} {value:.4f}")
    print(f"{'mIoU':<12} {metrics['miou']:.4f}\n{'pixel acc.':<12} {metrics['pixel_accuracy']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
