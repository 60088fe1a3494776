"""Helpers the tests share (tests/conftest.py keeps only fixtures): where things are, images to send,
and how good a mask is. `from support import ...` in a test; support.handlers drives the handler in-process."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from segserve.tools.scoring import mean_iou
from segserve.tools.server import TorchServe, free_ports

REPO = Path(__file__).resolve().parents[2]
MODEL_CONFIG = REPO / "model" / "model-config.yaml"
MODEL = "segmenter"


def encode_image(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def jpeg(image: Image.Image, quality: int = 92, **params) -> bytes:
    return encode_image(image, "JPEG", quality=quality, **params)


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width, channels) if channels else (height, width)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode)


def run_block(code: str, cwd: Path, env: Mapping[str, str], timeout: float,
              lang: str = "bash") -> subprocess.CompletedProcess:
    """A docs code block run as a reader would: bash with -euo pipefail, or this Python; output as text."""
    command = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def miou(mask: np.ndarray, truth: np.ndarray) -> float:
    """Mean IoU over the default model's 3 classes (segserve.tools.scoring, as make evaluate scores)."""
    return mean_iou(truth, mask, 3)


@contextlib.contextmanager
def torchserve(root: Path, store: Path, models: Sequence[str], ready: Sequence[str], timeout: float = 240,
               **options) -> Iterator[TorchServe]:
    """A real TorchServe on free loopback ports with token auth (the repo's config.properties), serving
    `models` from `store`, once every name in `ready` answers; stopped on the way out. `options` go to
    TorchServe (e.g. extra_properties)."""
    ts = TorchServe(workdir=root / "run", model_store=store, base_config=REPO / "config.properties",
                    ports=free_ports("inference", "management", "metrics", "grpc_inference", "grpc_management"),
                    models=tuple(models), **options)
    ts.start()
    try:
        for name in ready:
            ts.wait_ready(name, timeout=timeout)
        yield ts
    finally:
        ts.stop()
