"""format=coco: the request's masks as a COCO annotations file that `pycocotools.coco.COCO` loads.

One image (id 1, the request's size), the model's classes but the background as categories (category id
= class id), and one annotation per class present: its mask as COCO compressed RLE with `iscrowd: 1`
(COCO's convention for RLE annotations that may hold several regions, as COCO-Stuff's semantic masks do),
`area` in pixels and `bbox` = [x, y, width, height]. Per-region counts and boxes are `format=instances`.
"""

from __future__ import annotations

import json

import numpy as np

from .config import ServingConfig
from .masks import MaskSet


def coco_response(masks: MaskSet | np.ndarray, config: ServingConfig, classes: tuple[int, ...] | None = None,
                  file_name: str = "image.png") -> bytes:
    from pycocotools import mask as coco_mask

    masks = MaskSet.of(masks)
    height, width = masks.shape
    categories, annotations = [], []
    for c in config.classes:
        if c.id == 0 or (classes is not None and c.id not in classes):
            continue
        categories.append({"id": c.id, "name": c.name, "supercategory": "segserve"})
        binary = masks.binary(c.id)
        if not binary.any():
            continue
        rle = coco_mask.encode(np.asfortranarray(binary.astype(np.uint8)))
        x, y, w, h = (float(v) for v in coco_mask.toBbox(rle))
        annotations.append({"id": len(annotations) + 1, "image_id": 1, "category_id": c.id, "iscrowd": 1,
                            "area": int(binary.sum()), "bbox": [x, y, w, h],
                            "segmentation": {"size": [int(v) for v in rle["size"]],
                                             "counts": rle["counts"].decode("ascii")}})
    doc = {"info": {"description": f"{config.name} {config.version} ({config.family}, {config.head} head)"},
           "images": [{"id": 1, "width": int(width), "height": int(height), "file_name": file_name}],
           "categories": categories, "annotations": annotations}
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")
