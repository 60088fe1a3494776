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
- the REST format (segserve.formats), with its response-size check (413 before any work);
- what the request will cost, refused (413, naming the limit) before any pixel is decoded where it can be
  known: its sliding windows (`max_windows`) and its peak memory (`max_request_memory`, `request_memory`:
  pixels x bytes per pixel of its decoder, its inference path and its format's encoder). A request's
  fields are counted and sized (`max_fields`, `max_option_bytes`) before any of them is parsed.
The Plan is frozen: decoding, inference and encoding follow it and decide nothing again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from . import decode, formats, medical, tiling, v2
from .config import Limits, ServingConfig
from .decode import ImageFile
from .errors import BadRequest, InvalidOption, LimitExceeded, NotAcceptable, UnprocessableEntity, shown
from .formats import Format
from .options import IMAGE_FIELDS, JSON_IMAGE_KEYS, Options, parse_options, parse_postprocess
from .tiling import should_tile
from .v2 import V2Request

PILLOW, TORCHVISION = "pillow", "torchvision"  # Plan.decoder
MASK, PROBS = "mask", "probs"  # Plan.output

# What a plan's pixels come from: an encoded image opened lazily, pixels already (v2 UINT8, predict()), or a
# DICOM object or NIfTI volume opened and checked (segserve.medical).
Source = ImageFile | Image.Image | medical.VolumeSource


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
    medical: str | None = None  # DICOM or NIfTI input (segserve.medical): its frames are windowed images
    frames: int = 1  # model inputs of the request: a multi-frame DICOM's frames, a NIfTI volume's slices
    volume: bool = False  # a NIfTI volume for a 3-D model: one input, segmented by a 3-D sliding window

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
        check_fields(inputs, self.config.limits)
        if is_v2 and self.config.volume_roi is not None:
            raise UnprocessableEntity(VOLUMES_ONLY + " to /predictions (v2 carries 2-D images)")
        if is_v2:
            request, source = v2.parse(inputs, headers, self.config)
            decoded = isinstance(source, Image.Image)
            for width, height in (source.size,) if decoded else source.sizes:
                v2.check_size(width, height, request, self.config)
                self.check_memory(width, height, tiled=False, entry=None, classes=self.config.num_classes,
                                  decode_bytes=0 if decoded else source.decode_bytes)
            width, height = source.size if decoded else (source.header.width, source.header.height)
            # v2 answers the mask of the whole image resized to the model input, decoded in full.
            return Plan(index, request_id, width, height, tiled=False, decoder=PILLOW, reduce=False, output=MASK,
                        keep_image=False, options=Options(post=parse_postprocess({}, self.config)), v2=request), source
        options = parse_options(inputs, headers, self.config)
        entry = formats.get(options.format)
        data = decode.extract_image_bytes(inputs, content_types(headers))
        kind = medical.sniff(data, declared_type(inputs, headers))
        if self.config.volume_roi is not None:
            return self._plan_volume(index, request_id, kind, data, options, entry)
        if kind is not None or entry.needs_source is not None:
            return self._plan_medical(index, request_id, kind, data, options, entry)
        if options.medical_given:
            raise InvalidOption(f"{' and '.join(options.medical_given)} apply to DICOM and NIfTI input; this body is "
                                "an image: drop them")
        file = ImageFile(data, self.config.limits)
        classes = len(options.classes) if options.classes else self.config.num_classes
        for width, height in file.sizes:  # both turns of a PNG whose orientation only decoding tells
            formats.check_size(entry, width, height, classes, self.config.limits)
            tiled = should_tile(width, height, options.tile, self.config)
            if tiled:
                self.check_windows(width, height, options.tile)
            self.check_memory(width, height, tiled, entry, classes, file.decode_bytes)
        header = file.header
        tiled = should_tile(header.width, header.height, options.tile, self.config)
        # Windows are cut from the image at its own scale; an answer drawn on the image needs all of it.
        full_scale = tiled or entry.needs_image
        # Not CMYK JPEGs: torchvision's colours differ from Pillow's. Not JPEGs without an end marker either:
        # nvJPEG may decode a truncated one into a grey-filled image without an error, where Pillow says 400.
        batched = (self.batch_decode and not full_scale and header.format == "JPEG" and header.mode in ("RGB", "L")
                   and decode.ends_with_eoi(file.data))
        return Plan(index, request_id, header.width, header.height, tiled=tiled,
                    decoder=TORCHVISION if batched else PILLOW, reduce=not full_scale,
                    output=PROBS if entry.needs_probs else MASK, keep_image=entry.needs_image, format=entry,
                    options=options), file

    def _plan_medical(self, index: int, request_id: str | None, kind: str | None, data: bytes, options: Options,
                      entry: Format) -> tuple[Plan, Source]:
        """A DICOM or NIfTI request's plan: its frames resized to the model input, a single frame like an image."""
        if entry.needs_source is not None and kind != entry.needs_source:
            got = kind.upper() if kind else "neither DICOM nor NIfTI"
            raise BadRequest(f"format={entry.name} answers {entry.needs_source.upper()} input; this body is {got}: "
                             "ask for another format (png, json, ...)")
        if kind == medical.DICOM and "axis" in options.medical_given:
            raise InvalidOption("axis cuts a NIfTI volume into slices; a DICOM object's frames are its own: drop it")
        source = medical.open_source(kind, data, self.config, options)
        frames, width, height = source.frames, source.width, source.height
        if frames > 1 and not entry.volumes:
            volume_formats = ", ".join(name for name, f in formats.REGISTRY.items()
                                       if f.volumes and f.needs_source in (None, kind))
            raise BadRequest(f"format={entry.name} answers one image; this {kind.upper()} has {frames} "
                             f"{'frames' if kind == medical.DICOM else 'slices'}: ask for {volume_formats}")
        if frames > 1 and options.tile == "on":
            raise BadRequest(f"tile=on cuts one image into windows; this {kind.upper()} has {frames} images, each "
                             "resized to the model input: drop tile or send tile=off")
        classes = len(options.classes) if options.classes else self.config.num_classes
        formats.check_size(entry, width, height, classes, self.config.limits)
        tiled = frames == 1 and should_tile(width, height, options.tile, self.config)
        if tiled:
            self.check_windows(width, height, options.tile)
        self.check_memory(width, height, tiled, entry, classes, source.decode_bytes, frames)
        return Plan(index, request_id, width, height, tiled=tiled, decoder=PILLOW, reduce=False,
                    output=PROBS if entry.needs_probs else MASK, keep_image=entry.needs_image, format=entry,
                    options=options, medical=kind, frames=frames), source

    def _plan_volume(self, index: int, request_id: str | None, kind: str | None, data: bytes, options: Options,
                     entry: Format) -> tuple[Plan, Source]:
        """A 3-D model's request: a NIfTI volume, answered as a NIfTI label volume (the only format for it)."""
        shaping = [key for key in (*VOXEL_FREE_OPTIONS, "tile") if key in options.given]
        if shaping:
            raise InvalidOption(f"{', '.join(shaping)} apply to 2-D images and masks; a 3-D model runs its own "
                                "sliding window over the volume and answers each voxel's label: drop them")
        if kind != medical.NIFTI:
            got = "a DICOM object" if kind == medical.DICOM else "not a NIfTI volume"
            raise UnprocessableEntity(f"{VOLUMES_ONLY}; this body is {got}")
        if entry.needs_source != medical.NIFTI:
            names = ", ".join(name for name, f in formats.REGISTRY.items() if f.needs_source == medical.NIFTI)
            raise NotAcceptable(f"format={entry.name} answers 2-D images; this 3-D model answers a volume with its "
                                f"label volume: ask for format={names}")
        source = medical.open_source(kind, data, self.config, options)  # its memory checked from the header
        return Plan(index, request_id, source.width, source.height, tiled=False, decoder=PILLOW, reduce=False,
                    output=MASK, keep_image=False, format=entry, options=options, medical=kind,
                    frames=source.frames, volume=True), source

    def check_windows(self, width: int, height: int, tile: str) -> None:
        """Refuse (413) a tiled request over max_windows: a thin image needs a window per few rows."""
        config = self.config
        windows = tiling.window_count(width, height, config.tile_size, config.tiling.overlap)
        limit = config.limits.max_windows
        if windows > limit:
            hint = "send tile=off to have the whole image resized to the model input, or crop or split it" \
                if tile != "off" else "crop or split it"
            raise LimitExceeded(f"tiling this {width}x{height} image takes {windows} windows of "
                                f"{config.tile_size[1]}x{config.tile_size[0]}; the limit is {limit} (max_windows): "
                                f"{hint}")

    def check_memory(self, width: int, height: int, tiled: bool, entry: Format | None, classes: int,
                     decode_bytes: int, frames: int = 1) -> None:
        """Refuse (413) a request whose estimated peak memory is over max_request_memory."""
        need = request_memory(self.config, width, height, tiled=tiled, entry=entry, classes=classes,
                              decode_bytes=decode_bytes)
        if frames > 1:
            need += frames_memory(self.config, width, height, frames, entry, classes)
        limit = self.config.limits.max_request_memory
        if need > limit:
            fewer = ", ask for fewer classes" if entry is not None and entry.needs_probs else ""
            raise LimitExceeded(f"this {width}x{height} request would need about {need // 1_000_000} MB of memory; "
                                f"the limit is {limit // 1_000_000} MB (max_request_memory): send a smaller "
                                f"image{fewer}")

    def for_image(self, index: int, image: Image.Image, tile: str) -> Plan:
        """The plan for a decoded RGB image answered in-process with its mask (`tile` as the request option)."""
        return Plan(index, None, image.width, image.height,
                    tiled=should_tile(image.width, image.height, tile, self.config), decoder=PILLOW, reduce=False,
                    output=MASK, keep_image=False, options=Options(tile=tile, post=parse_postprocess({}, self.config)))


# Bytes per pixel of the stages after decoding (see request_memory): the mask (uint8), the decoded RGB image
# the tiled path and overlay keep (Pillow holds RGB in 4 bytes), float16 probabilities per class.
MASK_BYTES, IMAGE_BYTES, PROB_BYTES = 1, 4, 2


def request_memory(config: ServingConfig, width: int, height: int, *, tiled: bool, entry: Format | None,
                   classes: int, decode_bytes: int) -> int:
    """One request's estimated peak memory in bytes, the largest of its stages':
    - decoding: `decode_bytes` per pixel (ImageFile.decode_bytes);
    - inference, resized: the logits of every class upsampled to the image's size (float32, channels last), their
      argmax and its class ids (int64), the mask; for probabilities the softmax and the classes asked for
      (float32, then float16); tiled: the image, the output and one row of windows' blended logits
      (tiling.band_bytes);
    - encoding: the output, the image if the format draws on it, and the format's working bytes per pixel.
    `entry` None: a v2 answer (a mask, encoded as a tensor or a PNG)."""
    pixels = width * height
    everything = config.num_classes
    probs = entry is not None and entry.needs_probs
    keep_image = IMAGE_BYTES if entry is not None and entry.needs_image else 0
    output = PROB_BYTES * classes if probs else MASK_BYTES
    if tiled:
        inference = pixels * (IMAGE_BYTES + output) + tiling.band_bytes(width, everything, config.tile_size)
    else:
        upsampled = (8 * everything + 6 * classes) if probs else (4 * everything + 26)
        inference = pixels * (upsampled + keep_image)
    working = entry.working_bytes(classes) if entry is not None else v2.WORKING_BYTES
    extra = entry.working_extra(pixels, config.limits) if entry is not None else 0
    encoding = pixels * (output + keep_image + working) + extra
    return int(max(pixels * decode_bytes, inference, encoding))


def frames_memory(config: ServingConfig, width: int, height: int, frames: int, entry: Format | None,
                  classes: int) -> int:
    """What a request of several frames holds beside one frame's peak (request_memory): every frame's windowed
    RGB image (until its model input is made), model input (float32, 3 channels) and logits at the model's size
    (float32 per class), then its output at the image's size (a mask, or float16 probabilities per class asked
    for)."""
    model_pixels = config.input_size[0] * config.input_size[1]
    output = PROB_BYTES * classes if entry is not None and entry.needs_probs else MASK_BYTES
    return frames * (model_pixels * 4 * (3 + config.num_classes) + width * height * (IMAGE_BYTES + output))


# Request options a 3-D model's label volume has no use for (threshold, classes, window and axis it takes).
VOXEL_FREE_OPTIONS = ("smooth", "smooth_method", "fill_holes", "min_area", "instance_mask")
VOLUMES_ONLY = ("this model segments 3-D volumes: send a NIfTI volume (.nii or .nii.gz) and ask for format=nifti, "
                "its label volume")


def declared_type(inputs: dict[str, Any], headers: dict[str, Any]) -> str:
    """The content type the client declared for the image's input (application/dicom, ...), lower case."""
    declared = content_types(headers)
    key = next((key for key in IMAGE_FIELDS if key in inputs), None)
    return (declared.get(key) or "").split(";")[0].strip().lower() if key else ""


def check_fields(inputs: dict[str, Any], limits: Limits) -> None:
    """Refuse (400) a request with more fields than max_fields, or an option value longer than max_option_bytes,
    before any field is parsed: a form of 400,000 empty fields costs nothing more than its 400."""
    body = inputs.get("body")
    options = body if isinstance(body, dict) and not isinstance(body.get("inputs"), list) else {}  # not v2's
    # Counted, not listed: 400,000 fields must cost nothing.
    count = (len(inputs) - sum(key in inputs for key in IMAGE_FIELDS)
             + len(options) - sum(key in options for key in JSON_IMAGE_KEYS))
    if count > limits.max_fields:
        raise BadRequest(f"the request has {count} fields besides the image; the limit is {limits.max_fields} "
                         "(max_fields): send the image and the options it needs (docs/api.md#options)")
    fields = [*((k, v) for k, v in inputs.items() if k not in IMAGE_FIELDS),
              *((k, v) for k, v in options.items() if k != "image")]
    for key, value in fields:
        size = len(value) if isinstance(value, (str, bytes, bytearray, list, dict)) else 0
        if size > limits.max_option_bytes:
            raise BadRequest(f"the option {shown(key)} is {size} long; the limit is {limits.max_option_bytes} "
                             "(max_option_bytes): options are short words and numbers")
