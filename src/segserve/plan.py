"""Each request's plan: how it will be answered, decided once, up front, before any pixel is decoded.

From the request (its protocol, options and format) and its image header (Pillow's lazy open),
`Planner.plan` decides
- the protocol: segserve's REST API, or the Open Inference Protocol v2 (segserve.v2);
- tile or resize: sliding windows at the image's own scale (segserve.tiling), or the whole image
  resized to the model input;
- the decoder: Pillow, or torchvision's batched JPEG decode (runtime.decoder; nvJPEG on a GPU), and
  whether a large JPEG may be decoded reduced (Pillow's draft mode; only for resized REST plans whose
  answer is not drawn on the image);
- what inference makes for the encoder: a uint8 mask at the image's size, or float16 class
  probabilities; and whether the encoder needs the decoded image;
- the REST format (segserve.formats), with its response-size check (413 before any work).
The Plan is frozen: decoding, inference and encoding follow it and decide nothing again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from . import decode, formats, v2
from .config import ServingConfig
from .decode import ImageFile
from .formats import Format
from .options import Options, parse_options, parse_postprocess
from .tiling import should_tile
from .v2 import V2Request

PILLOW, TORCHVISION = "pillow", "torchvision"  # Plan.decoder
MASK, PROBS = "mask", "probs"  # Plan.output

# What a plan's pixels come from: an encoded image opened lazily, or pixels already (v2 UINT8, predict()).
Source = ImageFile | Image.Image


@dataclass(frozen=True)
class Plan:
    """How one request is answered."""

    index: int  # the request's slot in its batch
    request_id: str | None  # TorchServe's request id (the client sees it as x-request-id), for the logs
    width: int  # the image's upright size: the mask's, whatever the model sees
    height: int
    tiled: bool  # sliding windows at the image's own scale; else resized to the model input
    decoder: str  # PILLOW or TORCHVISION
    reduce: bool  # a large JPEG may be decoded at 1/2, 1/4 or 1/8 scale, never below the model input
    output: str  # MASK or PROBS: what inference makes for the encoder
    keep_image: bool  # the encoder draws on the decoded image
    format: Format | None = None  # the REST answer's format; None for v2 and for in-process predictions
    options: Options = Options()  # REST options (v2 requests carry theirs in `v2`)
    v2: V2Request | None = None  # a v2 request: how to answer it in v2 form

    @property
    def protocol(self) -> str:
        return "v2" if self.v2 is not None else "rest"


def content_types(headers: dict[str, Any]) -> dict[str, str]:
    """Per-input content types as TorchServe reports them: {"body": {"content-type": "image/png"}}."""
    return {k: v.get("content-type", "") for k, v in headers.items() if isinstance(v, dict)}


class Planner:
    """Plans requests for one model: its serving config and the device its worker runs on."""

    def __init__(self, config: ServingConfig, device: torch.device | str = "cpu"):
        self.config = config
        # JPEGs for the model are decoded by torchvision in one call per batch (nvJPEG on a GPU).
        self.batch_decode = config.decoder == "torchvision" or (
            config.decoder == "auto" and torch.device(device).type == "cuda")

    def plan(self, index: int, request_id: str | None, inputs: dict[str, Any], headers: dict[str, Any],
             is_v2: bool) -> tuple[Plan, Source]:
        """The request's plan and where its pixels come from; RequestError if it cannot be answered."""
        if is_v2:
            request, source = v2.parse(inputs, headers, self.config)
            width, height = (source.header.width, source.header.height) if isinstance(source, ImageFile) else \
                source.size
            # v2 answers the mask of the whole image resized to the model input, decoded in full.
            return Plan(index, request_id, width, height, tiled=False, decoder=PILLOW, reduce=False, output=MASK,
                        keep_image=False, options=Options(post=parse_postprocess({}, self.config)), v2=request), source
        options = parse_options(inputs, headers, self.config)
        entry = formats.get(options.format)
        file = ImageFile(decode.extract_image_bytes(inputs, content_types(headers)), self.config.limits)
        header = file.header
        tiled = should_tile(header.width, header.height, options.tile, self.config)
        # Windows are cut from the image at its own scale; an answer drawn on the image needs all of it.
        full_scale = tiled or entry.needs_image
        # Not CMYK JPEGs: torchvision's colours differ from Pillow's.
        batched = self.batch_decode and not full_scale and header.format == "JPEG" and header.mode in ("RGB", "L")
        classes = len(options.classes) if options.classes else self.config.num_classes
        formats.check_size(entry, header.width, header.height, classes, self.config.limits)
        return Plan(index, request_id, header.width, header.height, tiled=tiled,
                    decoder=TORCHVISION if batched else PILLOW, reduce=not full_scale,
                    output=PROBS if entry.needs_probs else MASK, keep_image=entry.needs_image, format=entry,
                    options=options), file

    def for_image(self, index: int, image: Image.Image, tile: str) -> Plan:
        """The plan for a decoded RGB image answered in-process with its mask (`tile` as the request option)."""
        return Plan(index, None, image.width, image.height,
                    tiled=should_tile(image.width, image.height, tile, self.config), decoder=PILLOW, reduce=False,
                    output=MASK, keep_image=False, options=Options(tile=tile, post=parse_postprocess({}, self.config)))
