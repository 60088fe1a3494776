"""`make bench` keeps working: a tiny run of every contender (no timing is checked, only that it measures)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from support import REPO

pytestmark = pytest.mark.integration

sys.path.insert(0, str(REPO))
from bench.photos import ELLIPSE_CLASS, RECTANGLE_CLASS, photo_and_labels, photo_jpeg  # noqa: E402
from bench.run import Result, ratios  # noqa: E402


def test_photos_are_deterministic_photo_sized_jpegs():
    data = photo_jpeg(3)
    assert data == photo_jpeg(3) and data != photo_jpeg(4)
    assert 100_000 < len(data) < 1_000_000
    assert Image.open(__import__("io").BytesIO(data)).size == (1280, 960)


def test_photo_labels_mark_the_drawn_objects():
    image, labels = photo_and_labels(3)
    assert image.tobytes() == photo_and_labels(3)[0].tobytes() and labels.shape == (960, 1280)
    assert set(np.unique(labels)) == {0, ELLIPSE_CLASS, RECTANGLE_CLASS}


def test_the_photo_model_segments_a_few_classes_like_a_trained_one():
    # Random weights give one class everywhere, which would make the mask step free in `make bench`.
    import torch

    from bench.photo_model import fit_photo_model
    from segserve.families import IMAGENET_MEAN, IMAGENET_STD, build_model
    from segserve.transforms import logits_to_mask, to_model_input

    torch.manual_seed(0)
    model = fit_photo_model(build_model("lraspp_mobilenet_v3_large", 21))
    image, labels = photo_and_labels(2)  # not one of the photos it was fitted to
    pixels = to_model_input(image, (390, 520), IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        mask = logits_to_mask(model(pixels[None])["out"][0], 960, 1280)
    assert set(np.unique(mask)) == {0, ELLIPSE_CLASS, RECTANGLE_CLASS}
    assert (mask == labels).mean() > 0.75


def test_ratios_are_taken_level_by_level():
    def result(contender, clients, rate, size=1000.0, p50=10.0):
        return Result("m", contender, clients, 10, 1.0, rate, p50, p50, p50, size, None)

    rows = ratios([result("raw", 1, 10), result("segserve", 1, 8, 10, 12), result("stock", 1, 2, 1000),
                   result("raw", 4, 20), result("segserve", 4, 18)])
    assert rows[0] == {"workload": "m", "concurrency": 1, "throughput_vs_raw": 0.8, "throughput_vs_stock": 4.0,
                       "throughput_vs_forward": None, "throughput_vs_litserve": None, "bytes_vs_stock": 0.01,
                       "p50_vs_raw_single": 1.2}
    assert rows[1]["throughput_vs_raw"] == 0.9 and rows[1]["throughput_vs_stock"] is None


def test_bench_runs_every_contender(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--concurrency", "2", "--requests", "2",
               "--lraspp-size", "128", "--contenders", "forward,raw,segserve,litserve,stock", "--out", str(tmp_path),
               "--name", "smoke"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "smoke.json").read_text())
    measured = {(r["workload"], r["contender"]) for r in report["results"]}
    assert measured == {(workload, contender) for workload in ("segmenter", "lraspp")
                        for contender in ("forward", "raw", "segserve", "litserve")} | {("lraspp", "stock")}
    assert all(r["errors"] == 0 and r["images_per_s"] > 0 for r in report["results"])
    stock = next(r for r in report["results"] if r["contender"] == "stock")
    ours = next(r for r in report["results"] if r["contender"] == "segserve" and r["workload"] == "lraspp")
    assert ours["response_bytes"] < stock["response_bytes"]  # a PNG mask vs stock's JSON float lists
    assert (tmp_path / "smoke.png").stat().st_size > 10_000
    assert "segserve, as a ratio within this run" in result.stdout
    assert all(row["throughput_vs_forward"] > 0 and row["throughput_vs_litserve"] > 0 for row in report["ratios"])
    # the same pipeline inside LitServe answers the same masks, byte for byte
    assert report["litserve_agreement"] == {w: {"images": 2, "equal": 2} for w in ("segmenter", "lraspp")}
