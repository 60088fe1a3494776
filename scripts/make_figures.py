"""Regenerate the README pictures: a sample scene and the served model's mask over it; then
docs/architecture-*.png (scripts/architecture.py, which also checks the worker boundary).

Run with `make figures` after `make train`. The input is a generated scene
(deterministic by seed) at a non-square size, to show masks come back at the
input's own size.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import architecture  # noqa: E402  (scripts/architecture.py, beside this file)

from segserve.encoders import mask_to_png, overlay  # noqa: E402
from segserve.pipeline import Segmenter  # noqa: E402
from segserve.tools.synthetic import generate_scene  # noqa: E402

SEED, SIZE = 2024, (384, 512)  # (height, width)


def main() -> int:
    docs = REPO / "docs"
    docs.mkdir(exist_ok=True)
    pixels, _ = generate_scene(SEED, SIZE)
    image = Image.fromarray(pixels)
    image.save(docs / "sample-input.png", optimize=True)
    segmenter = Segmenter.from_model_dir(REPO / "model")
    (mask,) = segmenter.predict([image])
    (docs / "sample-mask.png").write_bytes(mask_to_png(mask, segmenter.config.palette))
    colored = Image.fromarray(mask, "P")
    colored.putpalette(segmenter.config.palette)
    panels = [image, colored.convert("RGB"), overlay(image, mask, segmenter.config)]
    figure = Image.new("RGB", (image.width * 3 + 16, image.height), (255, 255, 255))
    for i, panel in enumerate(panels):
        figure.paste(panel, (i * (image.width + 8), 0))
    figure.save(docs / "sample-figure.jpg", quality=88)
    print(f"wrote {docs}/sample-input.png, sample-mask.png, sample-figure.jpg")
    return architecture.main(["--out", str(docs)])  # non-zero when the worker boundary is broken


if __name__ == "__main__":
    sys.exit(main())
