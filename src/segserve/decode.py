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
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import Limits
from .errors import BadRequest, EmptyBody, ImageTooLarge, InvalidImage, PayloadTooLarge, UnsupportedMediaType
from .options import IMAGE_FIELDS

ORIENTATION = 0x0112  # EXIF tag
ROTATED = (5, 6, 7, 8)  # orientations that swap width and height

# Declared body types we read; anything else (text/*, XML, ...) is a 415.
READABLE_TYPES = ("image/", "application/octet-stream", "application/json", "multipart/form-data",
                  "application/x-www-form-urlencoded", "binary/octet-stream")


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
    encoded = doc.get("image")
    if not isinstance(encoded, str) or not encoded:
        raise EmptyBody('a JSON body needs the image as base64 under "image", e.g. {"image": "iVBORw0..."}')
    if encoded.startswith("data:") and "," in encoded:
        encoded = encoded.split(",", 1)[1]  # data URL: data:image/png;base64,....
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage('"image" is not valid base64') from None


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

    Opening refuses what a full decode would (empty, oversize, unreadable). A JPEG's EXIF comes
    before its pixels, so its upright size is known before decoding; a PNG's eXIf may follow its
    pixels, and Pillow decodes a PNG to read it.
    """

    def __init__(self, data: bytes, limits: Limits):
        self.data = data
        self._limits = limits
        with _pillow_errors(limits):
            self._image = _open(data, limits)
            orientation = _orientation(self._image)
        # Pillow turns a TIFF upright itself as it loads it, and gives its size upright already.
        size = self._image.size if self._image.format == "TIFF" else _upright_size(self._image.size, orientation)
        self.header = ImageHeader(self._image.format, self._image.mode, *size, orientation)

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


def upright(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as stored -> as shown, for EXIF orientation 1-8 (what ImageOps.exif_transpose does)."""
    if orientation in ROTATED:
        pixels = pixels.transpose(-1, -2)  # 5 is exactly this; 6-8 add a flip
    flips = {2: (-1,), 3: (-1, -2), 4: (-2,), 6: (-1,), 7: (-1, -2), 8: (-2,)}.get(orientation)
    return pixels.flip(flips) if flips else pixels


def _open(data: bytes, limits: Limits) -> Image.Image:
    """Pillow's lazy open (the header only), refusing empty, oversize and pixel-less images."""
    if not data:
        raise EmptyBody("the request body is empty: send the image bytes")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"the image is {len(data)} bytes; the limit is {limits.max_bytes} bytes (max_bytes)")
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageTooLarge(f"the image is {width}x{height} = {width * height} pixels; the limit is "
                            f"{limits.max_pixels} pixels (max_pixels): send a smaller image or split it")
    if width == 0 or height == 0:
        raise InvalidImage(f"the image has no pixels ({width}x{height})")
    return image


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
    except UnidentifiedImageError:
        raise InvalidImage("the body is not an image format this server reads (JPEG, PNG, WebP, TIFF, BMP, "
                           "GIF)") from None
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
