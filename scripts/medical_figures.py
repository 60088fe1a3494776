"""docs/medical.md's picture, drawn from the handler's real answers (called in-process as a TorchServe worker calls
it) for a 16-bit CT sample of a synthetic scene (segserve.tools.medical_samples): the stored values as a viewer
without the window shows them (their full 16-bit range), the windowed image the model sees, the served overlay
(format=overlay), and the served DICOM SEG read back by highdicom, in the classes' colours.

Run with `make figures` (after `make train`).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from segserve.medical import open_source  # noqa: E402
from segserve.options import parse_options  # noqa: E402
from segserve.tools.inprocess import Request, handle, load_handler  # noqa: E402
from segserve.tools.medical_samples import scene_dicom  # noqa: E402

SEED = 2024
LABEL_HEIGHT = 18


def main() -> int:
    import highdicom
    import pydicom

    data, _ = scene_dicom((SEED,))
    handler = load_handler(REPO / "model")
    config = handler.segmenter.config

    def answer(fmt: str) -> bytes:
        (reply,) = handle(handler, [Request({"body": data, "format": fmt.encode()},
                                            {"body": {"content-type": "application/dicom"}})])
        if reply.status != 200:
            raise SystemExit(f"format={fmt}: {reply.status} {json.loads(reply.body)['message']}")
        return reply.body

    source = pydicom.dcmread(io.BytesIO(data))
    stored = source.pixel_array.astype(np.float64)
    full_range = Image.fromarray(np.rint(stored * 255 / 65535).astype(np.uint8)).convert("RGB")
    # The windowed frame, as the request path makes it (segserve.medical).
    windowed = open_source("dicom", data, config, parse_options({}, {}, config)).images()[0]
    overlay = Image.open(io.BytesIO(answer("overlay"))).convert("RGB")
    seg = highdicom.seg.segread(io.BytesIO(answer("dicom-seg")))
    labels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=True)[0]
    colours = np.array([c.color for c in config.classes], np.uint8)
    from_seg = Image.fromarray(colours[labels])
    panels = [("stored 16-bit, full range", full_range), ("windowed (the model's input)", windowed),
              ("format=overlay", overlay), ("format=dicom-seg, read back", from_seg)]
    width, height = windowed.size
    figure = Image.new("RGB", (len(panels) * (width + 8) - 8, height + LABEL_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(figure)
    for index, (title, panel) in enumerate(panels):
        x = index * (width + 8)
        draw.text((x + 2, 3), title, fill=(30, 30, 30))
        figure.paste(panel, (x, LABEL_HEIGHT))
    path = REPO / "docs" / "medical-overlay.png"
    figure.save(path, optimize=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
