"""Request body -> image bytes -> RGB PIL image, with limits checked early.

TorchServe hands the handler one dict per request: a raw body arrives under
`body` (or `data`), multipart fields under their field names, and a JSON body
is already parsed into a dict.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import Limits
from .errors import (
    BadRequest,
    EmptyBody,
    ImageTooLarge,
    InvalidImage,
    LimitExceeded,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from .options import IMAGE_FIELDS, JSON_IMAGE_KEYS

ORIENTATION = 0x0112  # EXIF tag
ROTATED = (5, 6, 7, 8)  # orientations that swap width and height

# Declared body types we read; anything else (text/*, XML, ...) is a 415.
READABLE_TYPES = ("image/", "application/octet-stream", "application/json", "multipart/form-data",
                  "application/x-www-form-urlencoded", "binary/octet-stream",
                  # DICOM and NIfTI (segserve.medical)
                  "application/dicom", "application/gzip", "application/x-gzip", "application/x-nifti",
                  "application/nifti")


def extract_image_bytes(request: dict[str, Any], content_types: dict[str, str] | None = None) -> bytes:
    """Find the image bytes in one TorchServe request dict.

    `content_types` maps input names to the content type the client declared for
    them (TorchServe reports it per input); it tells a broken JSON body, which
    TorchServe hands over as raw bytes, from an image.
    """
    content_types = content_types or {}
    present = [key for key in IMAGE_FIELDS if key in request]
    if len(present) > 1:
        raise BadRequest(f"one image per request: got fields {', '.join(present)}; send each image in its own "
                         "request (the client's predict_many does this concurrently)")
    for key in IMAGE_FIELDS:
        if key not in request:
            continue
        value = request[key]
        declared = (content_types.get(key) or "").split(";")[0].strip().lower()
        if declared and not declared.startswith(READABLE_TYPES):
            raise UnsupportedMediaType(f"Content-Type {declared!r} is not accepted; send the image as image/* or "
                                       "application/octet-stream, as multipart/form-data (field 'data'), or as "
                                       'application/json {"image": "<base64>"}')
        if declared == "application/json" and isinstance(value, (bytes, bytearray, str)):
            raise BadRequest('the body is not valid JSON; send {"image": "<base64>", "format": "png"}')
        if isinstance(value, dict):
            return _bytes_from_json(value)
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str):
            # TorchServe decodes text/* bodies to str; an image is never text.
            raise UnsupportedMediaType(
                "the body was sent as text; send the image bytes (e.g. curl --data-binary @image.jpg "
                "-H 'Content-Type: application/octet-stream') or as a multipart field named 'data'")
        if isinstance(value, list):
            raise BadRequest('a JSON array is not a request; send {"image": "<base64>"} or the raw bytes')
    raise EmptyBody("the request has no image: send the image bytes as the body, or as a multipart "
                    "field named 'data' or 'file'")


def _bytes_from_json(doc: dict[str, Any]) -> bytes:
    given = [key for key in JSON_IMAGE_KEYS if key in doc]
    if len(given) > 1:
        raise BadRequest('a JSON body carries one image: under "image" or under "data", not both')
    key = given[0] if given else "image"
    encoded = doc.get(key)
    if not isinstance(encoded, str) or not encoded:
        raise EmptyBody('a JSON body needs the image as base64 under "image" (or "data"), e.g. {"image": "iVBORw0..."}')
    if encoded.startswith("data:") and "," in encoded:
        encoded = encoded.split(",", 1)[1]  # data URL: data:image/png;base64,....
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage(f'"{key}" is not valid base64') from None


@dataclass(frozen=True)
class ImageHeader:
    """What Pillow reads from an image's header: enough to plan a request before any pixel is decoded."""

    format: str | None
    mode: str
    width: int  # upright, after the EXIF orientation
    height: int
    orientation: int  # EXIF orientation, 1 = as stored


class ImageFile:
    """An encoded image opened by Pillow lazily: its header read and the limits checked, then decoded once.

    Opening refuses what a full decode would (empty, oversize, unreadable, a format not allowed, decoder
    work over its limits). A JPEG's EXIF comes before its pixels, so its upright size is known before
    decoding; a PNG's eXIf may follow its pixels, and Pillow decodes a PNG to read it: `sizes` gives what
    is known without decoding, `header` the upright size (decoding such a PNG).
    """

    def __init__(self, data: bytes, limits: Limits):
        self.data = data
        self._limits = limits
        with _pillow_errors(limits):
            self._image = _open(data, limits)
        self._header: ImageHeader | None = None

    @property
    def format(self) -> str | None:
        return self._image.format

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """The upright (width, height), known without decoding a pixel: both turns of the stored size while only
        decoding would tell (a PNG whose eXIf, if any, follows its pixels), so checks can take the worse."""
        image = self._image
        if self._header is None and image.format == "PNG" and "exif" not in image.info:
            width, height = image.size
            return ((width, height), (height, width)) if width != height else ((width, height),)
        return ((self.header.width, self.header.height),)

    @property
    def header(self) -> ImageHeader:
        """Format, mode and upright size (a PNG without an eXIf before its pixels is decoded to read its own)."""
        if self._header is None:
            image = self._image
            with _pillow_errors(self._limits):
                orientation = _orientation(image)
            # Pillow turns a TIFF upright itself as it loads it, and gives its size upright already.
            size = image.size if image.format == "TIFF" else _upright_size(image.size, orientation)
            self._header = ImageHeader(image.format, image.mode, *size, orientation)
        return self._header

    @property
    def decode_bytes(self) -> int:
        """Bytes per pixel decoding holds at its peak (segserve.plan's memory estimate): Pillow's pixels as stored
        (4 bytes for any mode of several bands, RGB included), the RGB image made of them, the upright copy, and
        what high-bit-depth scaling (float32 copies) and a progressive JPEG (libjpeg's coefficients) add."""
        image = self._image
        mode = image.mode
        stored = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
        converted = 0 if mode == "RGB" else 4 + (4 if mode == "P" and "transparency" in image.info else 0)
        if mode in ("I", "F") or mode.startswith("I;16"):
            converted += 10  # to_rgb: float32 pixels and their scaled copy, the 8-bit gray image
        turned = 4  # ImageOps.exif_transpose returns a copy, turned or not
        coefficients = 2 * len(image.getbands()) if image.format == "JPEG" and image.info.get("progressive") else 0
        return stored + converted + turned + coefficients

    def decode(self, reduce_to: tuple[int, int] | None = None) -> Image.Image:
        """The upright RGB image, at its full size (the header's); with `reduce_to` (height, width), a JPEG much
        larger is decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself (Pillow's draft mode), never below it."""
        image = self._image
        stored = image.size
        with _pillow_errors(self._limits):
            if reduce_to and image.format == "JPEG":
                side = max(reduce_to)
                image.draft("RGB", (side, side))
            image.load()
        reduced = image.size != stored
        upright = to_rgb(ImageOps.exif_transpose(image))
        if not reduced and upright.size != (self.header.width, self.header.height):
            # The request was planned on the header's size: a mask of another size would be wrong.
            raise InvalidImage(f"the image's pixels ({upright.width}x{upright.height}) do not match the size its "
                               f"header gives ({self.header.width}x{self.header.height})")
        return upright


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """Decode image bytes into an upright RGB image, refusing oversize input before the full decode."""
    return ImageFile(data, limits).decode()


def _orientation(image: Image.Image) -> int:
    """EXIF orientation, 1 (as stored) when there is none."""
    return image.getexif().get(ORIENTATION, 1)


def _upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) as stored -> as shown: swapped by the orientations that turn the image a quarter."""
    width, height = size
    return (height, width) if orientation in ROTATED else (width, height)


def decode_jpegs(data: list[bytes], orientations: list[int], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes -> upright RGB uint8 tensors (3, H, W) on `device`, in one torchvision call.

    On a GPU this is nvJPEG decoding the whole batch at once, which moves the CPU's costliest step
    (about 30 ms per 1280x960 photo) off the CPU. torchvision raises for the whole list when one image
    fails: the caller then decodes each with Pillow, which names the broken one. torchvision's CUDA
    decoder ignores EXIF orientation, so it is applied here, on every device alike.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(item), dtype=torch.uint8) for item in data]
    with warnings.catch_warnings():
        # torchvision 0.29 marks its decoders deprecated in favour of TorchCodec; the pin keeps them.
        warnings.simplefilter("ignore", DeprecationWarning)
        images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    return [upright(image, orientation) for image, orientation in zip(images, orientations, strict=True)]


def ends_with_eoi(data: bytes) -> bool:
    """Whether a JPEG ends with its end-of-image marker (FF D9), allowing the zero or whitespace padding some
    writers add. A truncated JPEG does not; neither does one with a trailer after its image (then Pillow,
    which reads up to the marker, decodes it)."""
    return data.rstrip(b"\x00 \t\r\n").endswith(b"\xff\xd9")


def upright(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as stored -> as shown, for EXIF orientation 1-8 (what ImageOps.exif_transpose does)."""
    if orientation in ROTATED:
        pixels = pixels.transpose(-1, -2)  # 5 is exactly this; 6-8 add a flip
    flips = {2: (-1,), 3: (-1, -2), 4: (-2,), 6: (-1,), 7: (-1, -2), 8: (-2,)}.get(orientation)
    return pixels.flip(flips) if flips else pixels


def _open(data: bytes, limits: Limits) -> Image.Image:
    """Pillow's lazy open (the header only) of an allowed format, refusing empty, oversize, pixel-less images and
    decoder work that pixels do not bound; the format is known from the first bytes before any opener runs."""
    if not data:
        raise EmptyBody("the request body is empty: send the image bytes")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"the image is {len(data)} bytes; the limit is {limits.max_bytes} bytes (max_bytes)")
    fmt = sniff(data, limits.formats)
    if fmt == "JPEG":
        _check_jpeg_scans(data, limits)
    elif fmt == "TIFF":
        _check_tiff_strips(data, limits)
    # Pillow's own bomb check runs inside openers that allocate or decode at open (WebP's canvas); it raises
    # at twice MAX_IMAGE_PIXELS, so half of max_pixels (rounded up) makes it refuse what max_pixels would.
    Image.MAX_IMAGE_PIXELS = (limits.max_pixels + 1) // 2
    image = Image.open(io.BytesIO(data), formats=(fmt,))
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageTooLarge(f"the image is {width}x{height} = {width * height} pixels; the limit is "
                            f"{limits.max_pixels} pixels (max_pixels): send a smaller image or split it")
    if width == 0 or height == 0:
        raise InvalidImage(f"the image has no pixels ({width}x{height})")
    return image


def sniff(data: bytes, allowed: tuple[str, ...]) -> str:
    """The allowed format whose magic bytes `data` starts with, found by the format plugins' own checks of the
    first bytes (what Image.open tries first), so no opener or decoder of any other format ever runs:
    ICO and ICNS decode their embedded images inside Image.open. 415 for a format not allowed, 400 for none."""
    prefix = data[:16]  # what Image.open hands the plugins' checks
    Image.preinit()
    if any(name not in Image.OPEN for name in allowed):
        Image.init()
    for name in allowed:
        if _accepts(name, prefix):
            return name
    Image.init()
    for name in Image.ID:
        if name not in allowed and _accepts(name, prefix):
            raise UnsupportedMediaType(f"the image is {name}, a format this server does not read; send "
                                       f"{_names(allowed)} (handler.limits.formats)")
    raise InvalidImage(f"the body is not an image format this server reads ({_names(allowed)})")


def _accepts(name: str, prefix: bytes) -> bool:
    accept = Image.OPEN[name][1]
    try:
        return accept is not None and bool(accept(prefix))
    except (SyntaxError, IndexError, TypeError, struct.error):  # a prefix too short for it: as Image.open takes it
        return False


def _names(formats: tuple[str, ...]) -> str:
    return ", ".join(formats[:-1]) + f" or {formats[-1]}" if len(formats) > 1 else formats[0]


# JPEG markers: start of scan; the standalone ones (no length field): TEM, RST0-7, SOI, EOI.
SOS = 0xDA
STANDALONE = {0x01, *range(0xD0, 0xDA)}
# Header segments walked before the first scan at most; a file with more is taken at its upper bound.
MAX_JPEG_SEGMENTS = 4096


def jpeg_scans(data: bytes, at_most: int) -> int:
    """How many scans a JPEG has (exactly when over `at_most`; else possibly an upper bound, cheaply).

    Hand-written because neither Pillow nor the libjpeg it wraps tells before decoding, and libjpeg decodes
    every scan of a progressive JPEG over the whole image. Past the first scan, a 0xFF byte in compressed
    data is always followed by 0x00 or a restart marker, so each FF DA from there on starts a scan (a table
    between scans holding those two bytes would count once more: a refusal, never a miss). Before it, the
    header segments are skipped by their lengths: an EXIF thumbnail is a JPEG with scans of its own."""
    total = data.count(b"\xff\xda")
    if total <= at_most:
        return total
    at = 2
    for _ in range(MAX_JPEG_SEGMENTS):
        if at + 4 > len(data) or data[at] != 0xFF:
            break  # corrupt: the decoder will say so
        marker = data[at + 1]
        if marker == SOS:
            return data.count(b"\xff\xda", at)
        at += 1 if marker == 0xFF else 2 if marker in STANDALONE else 2 + int.from_bytes(data[at + 2:at + 4], "big")
    return total


def _check_jpeg_scans(data: bytes, limits: Limits) -> None:
    scans = jpeg_scans(data, limits.max_jpeg_scans)
    if scans > limits.max_jpeg_scans:
        raise LimitExceeded(f"the JPEG has {scans} scans; the limit is {limits.max_jpeg_scans} (max_jpeg_scans): "
                              "a progressive JPEG needs about 10; re-encode it (e.g. as a baseline JPEG)")


# TIFF tags: StripOffsets, TileOffsets; IFD entries read at most.
STRIP_OFFSETS, TILE_OFFSETS = 273, 324
MAX_TIFF_ENTRIES = 4096


def tiff_strips(data: bytes) -> int:
    """How many strips (or tiles) a TIFF's first image has, from the counts of its StripOffsets and TileOffsets
    entries. Hand-written because Pillow's TIFF opener itself makes a decoder tile per strip (400,000 strips:
    seconds and 160 MB inside Image.open); this reads a few bytes per IFD entry. 0 when unreadable (the opener
    then says what is wrong)."""
    order = "<" if data[:2] == b"II" else ">"
    try:
        if struct.unpack_from(order + "H", data, 2)[0] == 43:  # BigTIFF: 8-byte offsets and counts
            (ifd,) = struct.unpack_from(order + "Q", data, 8)
            (entries,) = struct.unpack_from(order + "Q", data, ifd)
            first, size, count_format = ifd + 8, 20, "Q"
        else:
            (ifd,) = struct.unpack_from(order + "I", data, 4)
            (entries,) = struct.unpack_from(order + "H", data, ifd)
            first, size, count_format = ifd + 2, 12, "I"
        parts = 0
        for entry in range(first, first + size * min(entries, MAX_TIFF_ENTRIES), size):
            tag, _, count = struct.unpack_from(order + "HH" + count_format, data, entry)
            if tag in (STRIP_OFFSETS, TILE_OFFSETS):
                parts = max(parts, count)
        return parts
    except struct.error:
        return 0


def _check_tiff_strips(data: bytes, limits: Limits) -> None:
    strips = tiff_strips(data)
    if strips > limits.max_tiff_strips:
        raise LimitExceeded(f"the TIFF has {strips} strips or tiles; the limit is {limits.max_tiff_strips} "
                            "(max_tiff_strips): re-encode it with larger strips (e.g. 64 KB each)")


@contextlib.contextmanager
def _pillow_errors(limits: Limits) -> Iterator[None]:
    """Pillow's exceptions -> our typed 400/413 errors with a message for the caller."""
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check (in _open) replaces Pillow's bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"the image has too many pixels; the limit is {limits.max_pixels} (max_pixels)") from None
    except UnidentifiedImageError:  # its first bytes are an allowed format's, its header is not
        raise InvalidImage(f"the image's header could not be read as {_names(limits.formats)}: the file is "
                           "corrupt or not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Truncated or corrupt data; Pillow's message says which ("image file is truncated").
        raise InvalidImage(f"the image could not be decoded: {_short(exc)}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB.

    High-bit-depth gray (16-bit PNG/TIFF, 32-bit int/float) is scaled by its own
    range; Pillow's plain convert would clip it to white. Alpha is dropped: the
    colour channels are kept as they are.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
        return Image.fromarray(scaled.round().astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
