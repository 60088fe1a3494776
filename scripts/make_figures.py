"""Regenerate the docs' pictures: the README's sample scene, its served mask and the overlay; one small picture
per response format (docs/formats/, drawn from the handler's real answers, called in-process as a TorchServe
worker calls it); tiled vs downscaled on a large scene (docs/large-images-tiling.png); then
docs/architecture-*.png (scripts/architecture.py, which also checks the worker boundary).

Run with `make figures` after `make train`. The input is a generated scene
(deterministic by seed) at a non-square size, to show masks come back at the
input's own size.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import architecture  # noqa: E402  (scripts/architecture.py, beside this file)

from segserve.encoders import mask_to_png, overlay  # noqa: E402
from segserve.pipeline import Segmenter  # noqa: E402
from segserve.tools.inprocess import Request, handle, load_handler  # noqa: E402
from segserve.tools.synthetic import generate_scene  # noqa: E402

SEED, SIZE = 2024, (384, 512)  # (height, width)
# The per-format pictures: this window of the sample scene (x, y, width, height), shown at 1:1.
FORMAT_CROP = (96, 64, 240, 180)
# docs/large-images.md's comparison: a 2048 x 2048 scene of the tiling benchmark (bench/tiling.py's first
# seed) and a window of it at 1:1.
LARGE_SEED, LARGE_SIZE, LARGE_CROP = 50000, (2048, 2048), (860, 860, 300, 300)


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
    format_pictures(image, docs / "formats")
    tiling_figure(segmenter, docs / "large-images-tiling.png")
    return architecture.main(["--out", str(docs)])  # non-zero when the worker boundary is broken


# -- one picture per format ------------------------------------------------------------------------------
def format_pictures(image: Image.Image, out: Path) -> None:
    """docs/formats/<format>.png: what each format's answer holds, drawn from the handler's answer for a window
    of the sample scene."""
    out.mkdir(parents=True, exist_ok=True)
    x, y, w, h = FORMAT_CROP
    crop = image.crop((x, y, x + w, y + h))
    handler = load_handler(REPO / "model")
    config = handler.segmenter.config if hasattr(handler, "segmenter") else Segmenter.from_model_dir(
        REPO / "model").config
    data = io.BytesIO()
    crop.save(data, format="PNG")

    def answer(format: str, **options: str) -> bytes:
        fields = {"body": data.getvalue(), "format": format.encode(), **{k: v.encode() for k, v in options.items()}}
        (reply,) = handle(handler, [Request(fields)])
        if reply.status != 200:
            raise SystemExit(f"format={format}: {reply.status} {reply.body[:300]!r}")
        return reply.body

    colors = {c.id: tuple(c.color) for c in config.classes}
    grey = crop.convert("L").convert("RGB")
    pictures = {}
    pictures["png"] = Image.open(io.BytesIO(answer("png"))).convert("RGB")

    summary = json.loads(answer("json"))
    mask = Image.open(io.BytesIO(base64.b64decode(summary["mask"])))
    panel = _beside(mask.convert("RGB"), 150)
    draw = ImageDraw.Draw(panel)
    draw.text((w + 8, 8), f'{summary["width"]} x {summary["height"]}', fill=(30, 30, 30))
    for row, c in enumerate(summary["classes"]):
        draw.rectangle([w + 8, 30 + row * 18, w + 18, 40 + row * 18], fill=colors[c["id"]], outline=(90, 90, 90))
        draw.text((w + 24, 29 + row * 18), f'{c["name"]} {100 * c["fraction"]:.1f}%', fill=(30, 30, 30))
    pictures["json"] = panel

    from pycocotools import mask as coco_mask

    rle = next(c for c in json.loads(answer("rle"))["classes"] if c["name"] == "nucleus")["rle"]
    binary = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
    runs = np.zeros(binary.size, np.int32)  # COCO runs go down the columns (Fortran order): number each run
    flat = binary.flatten(order="F")
    runs[1:] = np.cumsum(flat[1:] != flat[:-1])
    runs = runs.reshape(binary.shape, order="F")
    drawn = np.full((h, w, 3), 255, np.uint8)
    shades = np.array([colors[2], [255, 145, 0]], np.uint8)  # alternate runs in two colours
    drawn[binary] = shades[(runs[binary] // 2) % 2]
    pictures["rle"] = Image.fromarray(drawn)

    polygons = Image.blend(grey, Image.new("RGB", grey.size, (255, 255, 255)), 0.6)
    draw = ImageDraw.Draw(polygons)
    for feature in json.loads(answer("polygons", min_area="20"))["features"]:
        class_id = feature["properties"]["class_id"]
        if class_id == 0:
            continue
        for shape in feature["geometry"]["coordinates"]:  # always a MultiPolygon (encoders.polygons_response)
            for ring_index, ring in enumerate(shape):
                # vertices are pixel edges: drawn half a pixel up-left so they sit on the pixels' corners
                points = [(x - 0.5, y - 0.5) for x, y in ring]
                draw.line(points, fill=colors[class_id] if ring_index == 0 else (230, 0, 70), width=2)
                for point in points[:-1]:
                    draw.point(point, fill=(20, 20, 20))
    pictures["polygons"] = polygons

    doc = json.loads(answer("instances", min_area="30", instance_mask="true"))
    ids = np.asarray(Image.open(io.BytesIO(base64.b64decode(doc["instance_mask"]))))
    hues = np.random.default_rng(7).integers(60, 256, (int(ids.max()) + 1, 3), dtype=np.uint8)
    hues[0] = 255
    shown = Image.fromarray(hues[ids])
    draw = ImageDraw.Draw(shown)
    for region in doc["instances"]:
        bx, by, bw, bh = region["bbox"]
        draw.rectangle([bx, by, bx + bw - 1, by + bh - 1], outline=(40, 40, 40))
        cx, cy = region["centroid"]
        draw.ellipse([cx - 1.5, cy - 1.5, cx + 1.5, cy + 1.5], fill=(0, 0, 0))
    pictures["instances"] = shown

    pictures["overlay"] = Image.open(io.BytesIO(answer("overlay"))).convert("RGB")

    probs = np.load(io.BytesIO(answer("probs", classes="cell,nucleus")), allow_pickle=False).astype(np.float32)
    heat = [Image.fromarray((255 * (1 - p)).round().astype(np.uint8)).convert("RGB") for p in probs]
    both = Image.new("RGB", (2 * w + 6, h), (255, 255, 255))
    both.paste(heat[0], (0, 0))
    both.paste(heat[1], (w + 6, 0))
    pictures["probs"] = both

    for name, picture in pictures.items():
        path = out / f"{name}.png"
        picture.convert("RGB").quantize(64, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"wrote {out}/" + ", ".join(f"{name}.png" for name in pictures))


def _beside(picture: Image.Image, width: int) -> Image.Image:
    panel = Image.new("RGB", (picture.width + width, picture.height), (255, 255, 255))
    panel.paste(picture, (0, 0))
    return panel


# -- tiled vs downscaled -----------------------------------------------------------------------------------
def tiling_figure(segmenter: Segmenter, path: Path) -> None:
    """A window of a 2048 x 2048 scene at 1:1: the input, the generated truth, the tiled mask (tile=on) and the
    downscaled one (tile=off), with the mIoU of each whole mask against the truth."""
    pixels, truth = generate_scene(LARGE_SEED, LARGE_SIZE)
    image = Image.fromarray(pixels)
    tiled, = segmenter.predict([image], tile="on")
    resized, = segmenter.predict([image], tile="off")
    x, y, w, h = LARGE_CROP
    palette = segmenter.config.palette

    def window(labels: np.ndarray) -> Image.Image:
        shown = Image.fromarray(labels[y:y + h, x:x + w].astype(np.uint8), "P")
        shown.putpalette(palette)
        return shown.convert("RGB")

    classes = len(segmenter.config.classes)
    panels = [("input (2048 x 2048, a window at 1:1)", image.crop((x, y, x + w, y + h))),
              ("generated truth", window(truth)),
              (f"tile=on: mIoU {_miou(tiled, truth, classes):.3f}", window(tiled)),
              (f"tile=off (downscaled): mIoU {_miou(resized, truth, classes):.3f}", window(resized))]
    figure = Image.new("RGB", (4 * w + 3 * 8, h + 22), (255, 255, 255))
    draw = ImageDraw.Draw(figure)
    for i, (title, panel) in enumerate(panels):
        figure.paste(panel, (i * (w + 8), 22))
        draw.text((i * (w + 8) + 2, 4), title, fill=(30, 30, 30))
    figure.quantize(64, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"wrote {path}")


def _miou(mask: np.ndarray, truth: np.ndarray, classes: int) -> float:
    ious = []
    for c in range(classes):
        union = np.logical_or(mask == c, truth == c).sum()
        if union:
            ious.append(np.logical_and(mask == c, truth == c).sum() / union)
    return float(np.mean(ious))


if __name__ == "__main__":
    sys.exit(main())
