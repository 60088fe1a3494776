"""The REST API's response formats: one registry entry per format, read by every part of the request path.

An entry says all the request path needs to know about its format: the name a request asks for
(`format=...`, or the URL path's last part), the content type of the answer, the `Accept` media types
that select it, what its encoder needs (the decoded image to draw on? class probabilities instead of a
mask?), the encoder, an estimate of the answer's size in bytes from the image's width, height and
the number of classes asked for, made before any pixel is decoded, and the memory its encoder works
with per pixel (segserve.plan adds it to the request's memory estimate).

Answers are held to `limits.max_response_bytes` three times: up front (413 before any work) where the
size is known from the header alone (`capped`: probs); while encoding, where it is known from the mask
(rle's counts, the polygons' rings and vertices: segserve.encoders); and every answer once encoded
(`encode`), so no answer ever reaches TorchServe's max_response_size, over which its frontend drops
the worker and every request of its batch. The other estimates are upper bounds for noise-like masks.

Adding a format is one entry here, and its tests. The Open Inference Protocol v2 is a protocol with
its own two output kinds (segserve.v2), not a format.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from . import encoders
from .config import Limits, ServingConfig
from .errors import NotAcceptable, ResponseTooLarge, shown
from .masks import MaskSet

if TYPE_CHECKING:
    from .options import Options


@dataclass(frozen=True)
class EncoderInput:
    """What an encoder gets for one request."""

    output: MaskSet | np.ndarray  # the masks (post-processed); float16 probabilities (classes, H, W) if needs_probs
    options: Options
    config: ServingConfig
    image: Image.Image | None = None  # the decoded RGB image at its own size, if needs_image
    source: Any = None  # DICOM or NIfTI input: its segserve.medical source (what a SEG or label volume references)


@dataclass(frozen=True)
class Format:
    name: str
    content_type: str
    accept: tuple[str, ...]  # Accept media types that select this format (each claimed by one format)
    encode: Callable[[EncoderInput], bytes]
    estimate: Callable[[int, int, int], int]  # (width, height, classes asked for) -> answer bytes
    needs_image: bool = False  # the encoder draws on the decoded image (which is then never reduced)
    needs_probs: bool = False  # the encoder takes class probabilities, not a mask
    capped: bool = False  # refused with 413 up front when the estimate is over limits.max_response_bytes
    too_large_hint: str = "send a smaller image"  # how to get under the cap
    # Bytes per pixel the encoder works with beside the mask (and the image it draws on), for k classes asked
    # for: its copies and temporaries at their peak (segserve.plan's memory estimate).
    working_bytes: Callable[[int], float] = lambda k: 8
    # Bytes beyond those, from (pixels, limits): what grows with the answer's content rather than its pixels.
    working_extra: Callable[[int, Limits], int] = lambda pixels, limits: 0
    # Medical answers (segserve.medical): the input they need (DICOM, NIfTI), and whether they answer every frame
    # of a multi-frame DICOM or every slice of a volume (the other formats answer one image).
    needs_source: str | None = None
    volumes: bool = False


def _png_bytes(width: int, height: int) -> int:
    """An indexed PNG: a filter byte per row, deflate's worst case (5 bytes per 16 KiB over raw), palette, chunks."""
    raw = height * (width + 1)
    return raw + 5 * (raw // 16_384 + 1) + 1024


def _summary_bytes(classes: int) -> int:
    """The JSON head and per-class entries (id, name, pixels, fraction, bbox) around the mask."""
    return 512 + 256 * classes


def _json(job: EncoderInput) -> bytes:
    return encoders.json_response(job.output, job.config, job.options.classes)


def _png(job: EncoderInput) -> bytes:
    return encoders.mask_to_png(MaskSet.of(job.output).keep_classes(job.options.classes).labels, job.config.palette)


def _rle(job: EncoderInput) -> bytes:
    return encoders.rle_response(job.output, job.config, job.options.classes)


def _polygons(job: EncoderInput) -> bytes:
    return encoders.polygons_response(job.output, job.config, job.options.classes)


def _coco(job: EncoderInput) -> bytes:
    from .coco import coco_response

    return coco_response(job.output, job.config, job.options.classes)


def _instances(job: EncoderInput) -> bytes:
    return encoders.instances_response(job.output, job.config, job.options.classes, job.options.instance_mask)


def _overlay(job: EncoderInput) -> bytes:
    labels = MaskSet.of(job.output).keep_classes(job.options.classes).labels
    return encoders.overlay_jpeg(job.image, labels, job.config)


def _probs(job: EncoderInput) -> bytes:
    return encoders.probs_npy(job.output)


def _frames(job: EncoderInput) -> list:
    """The masks (or probabilities) of each frame: a request of one image has its own only."""
    return job.output if isinstance(job.output, list) else [job.output]


def _dicom_seg(job: EncoderInput, fractional: bool = False) -> bytes:
    from .medical.seg import dicom_seg

    return dicom_seg(_frames(job), job.source, job.config, job.options.classes, fractional)


def _nifti(job: EncoderInput) -> bytes:
    return job.source.answer([MaskSet.of(m).keep_classes(job.options.classes).labels for m in _frames(job)],
                             job.config)


def _slices(job: EncoderInput) -> bytes:
    """A zip of one indexed PNG mask per frame or slice, in order (slice_0000.png, ...)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # PNGs are deflated already
        for number, masks in enumerate(_frames(job)):
            labels = MaskSet.of(masks).keep_classes(job.options.classes).labels
            archive.writestr(f"slice_{number:04d}.png", encoders.mask_to_png(labels, job.config.palette))
    return buffer.getvalue()


REGISTRY: dict[str, Format] = {f.name: f for f in (
    Format("json", "application/json", ("application/json",), _json,
           # the mask PNG in base64 (4 bytes per 3)
           lambda w, h, k: _summary_bytes(k) + 4 * (_png_bytes(w, h) // 3 + 1),
           # the class subset's copy, one class's pixels at a time, the PNG, its base64, the JSON text and bytes
           working_bytes=lambda k: 6, too_large_hint="use format=png (the mask without base64 and JSON)"),
    Format("png", "image/png", ("image/png",), _png, lambda w, h, _: _png_bytes(w, h),
           working_bytes=lambda k: 3),
    Format("rle", "application/json", (), _rle,
           # COCO's compressed counts: at most one run per pixel, one or two characters per short run
           lambda w, h, k: _summary_bytes(k) + k * (2 * w * h + 64),
           # per class: its pixels, labels of min_area's regions (int32), the Fortran copy, the runs (uint32);
           # the counts of every class and the JSON text
           working_bytes=lambda k: 8 + 2 * k,
           too_large_hint="use format=png, or min_area=... to drop small regions"),
    Format("polygons", "application/json", (), _polygons,
           # at most a closed ring of two "[x,y]," points per pixel of a class, plus the ring's brackets
           lambda w, h, k: _summary_bytes(k) + k * w * h * (2 * (2 * len(str(max(w, h))) + 4) + 8),
           # per class: its pixels, the labels counting its rings (int32, two passes) and the 4-connected
           # regions' (int32), a region's 2x copy and OpenCV's; and the vertices as Python lists and shapely
           # geometries (~200 bytes each), at most max_polygon_vertices of them
           working_bytes=lambda k: 18,
           working_extra=lambda pixels, limits: 200 * min(limits.max_polygon_vertices, 4 * pixels),
           too_large_hint="use format=rle or png, or min_area=... to drop small regions"),
    Format("coco", "application/json", (), _coco,
           # rle's counts per class, in COCO's annotations file
           lambda w, h, k: _summary_bytes(k) + k * (2 * w * h + 64), working_bytes=lambda k: 12 + 4 * k,
           too_large_hint="use format=png, or min_area=... to drop small regions"),
    Format("instances", "application/json", (), _instances,
           # at most one region per 4 pixels of a class (8-connected), ~160 bytes each, plus the uint16 PNG
           lambda w, h, k: _summary_bytes(k) + k * (w * h // 4 + 1) * 160 + 4 * (2 * _png_bytes(w, h) // 3 + 1),
           # per class: its pixels and region labels (int32), the instance ids (uint16), the PNG and its base64
           working_bytes=lambda k: 16, too_large_hint="raise min_area, ask for fewer classes, or use format=png"),
    Format("overlay", "image/jpeg", ("image/jpeg",), _overlay,
           # JPEG at quality 90 stays under the raw RGB even for noise; the tables and legend on top
           lambda w, h, _: 3 * w * h + 4096, needs_image=True,
           # the class subset's copy, the RGB pixels blended in place and their bytes, the tinted image, the JPEG
           working_bytes=lambda k: 13, too_large_hint="send a smaller image, or use format=png"),
    Format("probs", "application/x-npy", ("application/x-npy",), _probs,
           # float16 per class and pixel (the .npy header aside)
           lambda w, h, k: k * w * h * 2, needs_probs=True, capped=True,
           too_large_hint="ask for fewer classes (classes=...), send a smaller image, or use format=png",
           working_bytes=lambda k: 6 * k),
    # DICOM and NIfTI input (segserve.medical, docs/medical.md). Their estimates are for one frame.
    Format("dicom-seg", "application/dicom", ("application/dicom",), _dicom_seg,
           # a bit per pixel and segment, and the SEG's header and per-frame functional groups
           lambda w, h, k: k * (w * h // 8 + 1) + 65_536, needs_source="dicom", volumes=True,
           # the frames' bool stack per segment, highdicom's copies of it and its packed bits
           working_bytes=lambda k: 3 * k + 2, too_large_hint="ask for fewer classes, or send fewer frames"),
    Format("dicom-seg-fractional", "application/dicom", (), lambda job: _dicom_seg(job, fractional=True),
           lambda w, h, k: k * w * h + 65_536, needs_probs=True, needs_source="dicom", volumes=True,
           working_bytes=lambda k: 10 * k, too_large_hint="ask for fewer classes, or send fewer frames"),
    Format("nifti", "application/gzip", ("application/gzip", "application/x-nifti"), _nifti,
           lambda w, h, k: w * h + 65_536, needs_source="nifti", volumes=True,
           # the stacked labels, their transposed copy, the NIfTI bytes and their gzip
           working_bytes=lambda k: 5, too_large_hint="send fewer slices"),
    Format("slices", "application/zip", ("application/zip",), _slices,
           lambda w, h, _: _png_bytes(w, h) + 128, volumes=True, working_bytes=lambda k: 3,
           too_large_hint="send fewer frames or slices"),
)}
DEFAULT = "json"


def get(name: str) -> Format:
    return REGISTRY[name]


def for_accept(accept: str) -> Format | None:
    """The format an Accept header selects, by HTTP's rules (RFC 9110): its media ranges by quality, highest
    first (in order among equals); `type/*` picks the first format of that type (image/* -> png), `*/*` the
    default. None for no Accept header; NotAcceptable when every range it names is one no format answers in
    (the message lists the formats and their media types)."""
    ranges = []
    for position, media_range in enumerate(accept.split(",")):
        media, *params = (part.strip().lower() for part in media_range.split(";"))
        quality = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    quality = float(param[2:])
                except ValueError:
                    quality = 0.0
        if media and quality > 0:
            ranges.append((-quality, position, media))
    if not accept.strip():
        return None
    for _, _, media in sorted(ranges):
        if media == "*/*":
            return REGISTRY[DEFAULT]
        for entry in REGISTRY.values():
            if media in entry.accept or (media.endswith("/*") and entry.content_type.startswith(media[:-1])):
                return entry
    offered = ", ".join(f"{entry.name} ({entry.content_type})" for entry in REGISTRY.values())
    raise NotAcceptable(f"no format answers in Accept: {shown(accept)}; ask for one of: {offered} (or format=...)")


def check_size(entry: Format, width: int, height: int, classes: int, limits: Limits) -> None:
    """Refuse (413) before any work an answer of a capped format that would be over max_response_bytes."""
    if not entry.capped:
        return
    size = entry.estimate(width, height, classes)
    limit = limits.max_response_bytes
    if size > limit:
        raise ResponseTooLarge(f"format={entry.name} for this {width}x{height} image would be {size} bytes; the limit "
                              f"is {limit} (max_response_bytes): {entry.too_large_hint}")


def encode(entry: Format, job: EncoderInput) -> bytes:
    """The format's answer, refused (413) when it came out over max_response_bytes: the last of the three checks,
    for every format, so TorchServe's frame limit is never reached whatever the estimates missed."""
    body = entry.encode(job)
    limit = job.config.limits.max_response_bytes
    if len(body) > limit:
        height, width = (job.output[0] if isinstance(job.output, list) else job.output).shape[-2:]
        raise ResponseTooLarge(f"format={entry.name} for this {width}x{height} image came to {len(body)} bytes; the "
                               f"limit is {limit} (max_response_bytes): {entry.too_large_hint}")
    return body
