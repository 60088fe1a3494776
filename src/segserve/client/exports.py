"""Dataset files for a folder of answers, written by `segserve predict --coco FILE` / `--cvat DIR`.

Both are built from what the server answers per image and stream: each answer is written to its own file as it
arrives (so an interrupted run continues where it stopped, as plain `predict` does), and the dataset's index is
written once at the end from those files, reading one at a time.

- COCO: the per-image `format=coco` answers (saved under --out) merged into one dataset file: images with their
  path relative to the folder named as `file_name`, ids 1, 2, ... in the (sorted) order of the images; the
  categories of the answers; their annotations (compressed RLE, area, bbox, iscrowd) with ids renumbered.
  Written as JSON by hand, not with pycocotools (a server dependency the client does without).
- CVAT "Segmentation mask 1.1" (the Pascal VOC layout): SegmentationClass/<name>.png, the class-id PNG of each
  `format=json` answer, whose palette holds the class colours; labelmap.txt (`name:r,g,b::` per class, in class
  id order, from the answers' class names and the PNG palette); ImageSets/Segmentation/default.txt listing the
  names. CVAT (datumaro) maps each pixel's colour to the labelmap line of that colour.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tempfile
from pathlib import Path

from PIL import Image

from .api import Prediction

LABELMAP = "labelmap.txt"
SEGMENTATION_CLASS = "SegmentationClass"
IMAGE_SET = Path("ImageSets") / "Segmentation" / "default.txt"


def _replace(path: Path, text_parts) -> None:
    """Write `path` all at once (a .partial renamed over it), from an iterable of strings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as out:
        for part in text_parts:
            out.write(part)
    os.replace(partial, path)


class CocoDataset:
    """One COCO dataset file from the per-image format=coco answers saved under --out."""

    format = "coco"
    saved_as = ".json"

    def __init__(self, path: Path):
        self.path = path

    def output_bytes(self, result: Prediction) -> bytes:
        return result.content

    def finish(self, done: list[tuple[str, Path]]) -> int:
        """`done`: (file name relative to the folder, saved answer) per image in order. Annotations pass through
        a temporary file, so memory holds one answer and the image list, however large the folder."""
        images, categories = [], {}
        with tempfile.TemporaryFile("w+", encoding="utf-8") as annotations:
            count = 0
            for image_id, (file_name, saved) in enumerate(done, start=1):
                doc = json.loads(saved.read_text())
                (image,) = doc["images"]
                images.append({"id": image_id, "file_name": file_name, "width": image["width"],
                               "height": image["height"]})
                for category in doc.get("categories", []):
                    categories.setdefault(category["id"], category)
                for annotation in doc.get("annotations", []):
                    count += 1
                    annotations.write(("," if count > 1 else "")
                                      + json.dumps({**annotation, "id": count, "image_id": image_id},
                                                   separators=(",", ":")))
            annotations.seek(0)
            head = {"info": {"description": "segserve predict --coco", "version": "1.0"},
                    "images": images, "categories": [categories[k] for k in sorted(categories)]}
            text = json.dumps(head, separators=(",", ":"))
            _replace(self.path, [text[:-1], ',"annotations":[', *iter(lambda: annotations.read(1 << 16), ""), "]}"])
        return len(images)


class CvatExport:
    """A CVAT "Segmentation mask 1.1" folder from format=json answers: the masks go in as they arrive."""

    format = "json"
    saved_as = ".png"

    def __init__(self, folder: Path):
        self.folder = folder
        self.classes: dict[int, tuple[str, tuple[int, int, int]]] = {}
        self.written: dict[int, tuple[str, tuple[int, int, int]]] = {}

    @property
    def masks(self) -> Path:
        return self.folder / SEGMENTATION_CLASS

    def output_bytes(self, result: Prediction) -> bytes:
        """The answer's class-id PNG (written as SegmentationClass/<name>.png); its classes noted for labelmap.txt."""
        doc = result.json()
        png = base64.b64decode(doc["mask"])
        palette = Image.open(io.BytesIO(png)).getpalette() or []
        for entry in doc["classes"]:
            class_id = int(entry["id"])
            color = tuple(palette[3 * class_id: 3 * class_id + 3]) if len(palette) >= 3 * class_id + 3 else None
            if color is not None:
                self.classes.setdefault(class_id, (str(entry["name"]), color))
        if 0 not in self.classes and len(palette) >= 3:  # pixels of classes not asked for are 0: still a label
            self.classes[0] = ("background", tuple(palette[:3]))
        if self.classes != self.written:  # at the first answer already: a run stopped later still has it
            self._write_labelmap()
        return png

    def _write_labelmap(self) -> None:
        lines = [f"{name}:{','.join(str(c) for c in color)}::\n" for _, (name, color) in sorted(self.classes.items())]
        _replace(self.folder / LABELMAP, ["# label:color_rgb:parts:actions\n", *lines])
        self.written = dict(self.classes)

    def finish(self, done: list[tuple[str, Path]]) -> int:
        names = [saved.relative_to(self.masks).with_suffix("").as_posix() for _, saved in done]
        _replace(self.folder / IMAGE_SET, [f"{name}\n" for name in names])
        return len(names)
