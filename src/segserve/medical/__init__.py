"""Medical images in, medical answers out (docs/medical.md): DICOM (pydicom) and NIfTI (nibabel) input, DICOM SEG
(highdicom) and NIfTI label volumes out.

A DICOM object or a NIfTI volume opens as a `VolumeSource` (segserve.medical.dicom, segserve.medical.nifti): its
header checked against the limits before any pixel is decoded, then its frames (or slices) windowed to the 8-bit
images the model was trained on, one model input each, answered together for the request.

The libraries are the `medical` extra, imported only when such a body arrives: a worker without them answers it
with a 415 naming the extra and keeps serving everything else. Their messages may quote dataset values (a
patient's name), so none of them reaches an error body or the log: every failure is one of ours, worded here.
"""

from __future__ import annotations

import importlib
import logging
import zlib
from typing import TYPE_CHECKING, Protocol

from ..errors import EmptyBody, PayloadTooLarge, UnsupportedMediaType

if TYPE_CHECKING:
    from PIL import Image

    from ..config import ServingConfig
    from ..options import Options

DICOM, NIFTI = "dicom", "nifti"  # VolumeSource.kind
DICOM_TYPES = ("application/dicom",)
NIFTI_TYPES = ("application/gzip", "application/x-gzip", "application/x-nifti", "application/nifti")
EXTRA = "medical"
NIFTI_HEADER_BYTES = 540  # a NIfTI-2 header; NIfTI-1's is 348
# The libraries whose messages and warnings could carry dataset values.
QUIET_LOGGERS = ("pydicom", "highdicom", "nibabel")


class VolumeSource(Protocol):
    """A medical body opened and checked: `frames` images of `width` x `height` once decoded."""

    kind: str
    frames: int
    width: int
    height: int
    decode_bytes: int  # bytes per pixel of one frame decoding holds at its peak (segserve.plan's estimate)

    def images(self) -> list[Image.Image]:
        """The frames windowed to 8-bit RGB images, in order."""


def sniff(data: bytes, declared: str) -> str | None:
    """DICOM or NIFTI when the body is one (from its first bytes, or a declared application/dicom), else None.
    Reads a few hundred bytes at most (a gzip's first 540 decompressed): no library is imported here."""
    if data[128:132] == b"DICM" or declared in DICOM_TYPES:
        return DICOM
    head = data[:NIFTI_HEADER_BYTES]
    if data[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(wbits=31).decompress(data, NIFTI_HEADER_BYTES)
        except zlib.error:
            return None
    return NIFTI if is_nifti_header(head) else None


def is_nifti_header(head: bytes) -> bool:
    """NIfTI-1 (sizeof_hdr 348, magic n+1 at 344) or NIfTI-2 (540, n+2 at 4), either byte order. Single-file
    images only: a header-only .hdr (magic ni1) needs its .img, which one request cannot carry."""
    size = head[:4]
    if size in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c"):
        return head[344:348] == b"n+1\x00"
    if size in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c"):
        return head[4:8] == b"n+2\x00"
    return False


def check_body(data: bytes, max_bytes: int, what: str) -> None:
    """Refuse an empty body (400) or one over max_bytes (413) before any parser sees it."""
    if not data:
        raise EmptyBody(f"the request body is empty: send the {what}'s bytes")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the {what} is {len(data)} bytes; the limit is {max_bytes} bytes (max_bytes)")


def require(module: str):
    """Import one of the extra's libraries, or refuse the request (415) naming the extra to install."""
    try:
        imported = importlib.import_module(module)
    except ImportError:
        from ..families import install_hint

        raise UnsupportedMediaType(f"DICOM and NIfTI input need the {module} package, which this server lacks: "
                                   f"install segserve's {EXTRA!r} extra ({install_hint(EXTRA)})") from None
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return imported


def open_source(kind: str, data: bytes, config: ServingConfig, options: Options) -> VolumeSource:
    """The body as a checked VolumeSource (RequestError if it cannot be answered), windowed as `options` say."""
    if kind == DICOM:
        from .dicom import DicomSource

        return DicomSource(data, config, options.window)
    from .nifti import NiftiSource

    return NiftiSource(data, config, options.window, options.axis)
