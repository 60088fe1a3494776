"""A DICOM object (pydicom) -> checked header -> windowed 8-bit RGB frames, one per frame of a multi-frame object.

1. the dataset is parsed (its pixel data kept encoded) and its header checked before any pixel is decoded:
   pixel data present, a transfer syntax of the allow-list whose decoder is installed (else a 415 naming it),
   a photometric interpretation read here, frames (`max_frames`), pixels (`max_pixels`, all frames together),
   and, uncompressed, pixel data as long as its header says;
2. each frame decoded (pydicom and the pylibjpeg plugins) and brought to what the model was trained on:
   monochrome through the modality transform (Rescale Slope and Intercept, or the Modality LUT) and the VOI
   window (the request's, the model's preset, or the file's own; else the object's own range), MONOCHROME1
   inverted; RGB and YBR (converted by pydicom) and PALETTE COLOR (its lookup table) taken as colour, 8 bits.
Messages never carry a dataset value: structure only (sizes, counts, UIDs of syntaxes).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from PIL import Image

from ..config import ServingConfig, Window
from ..errors import (
    ImageTooLarge,
    InvalidImage,
    LimitExceeded,
    RequestError,
    UnprocessableImage,
    UnsupportedMediaType,
)
from . import DICOM, check_body, require
from .window import FUNCTIONS, LINEAR, LINEAR_EXACT, apply_window, range_window, to_8bit

# Transfer syntaxes read: uncompressed, and the compressed ones the extra's decoders handle (pydicom's RLE,
# pylibjpeg-libjpeg, pyjpegls, pylibjpeg-openjpeg). Not Deflated: its inflate at parse time has no bound.
ALLOWED_SYNTAXES = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still written)
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (8 bit)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (12 bit)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
)
UNCOMPRESSED = ALLOWED_SYNTAXES[:3]
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
FRAME_BYTES = 12  # per pixel: the frame's modality values (float64) and its 8-bit and RGB images


class DicomSource:
    """One DICOM object opened and checked (the constructor refuses what cannot be answered)."""

    kind = DICOM

    def __init__(self, data: bytes, config: ServingConfig, window: str | Window):
        limits = config.limits
        check_body(data, limits.max_bytes, "DICOM file")
        pydicom = require("pydicom")
        self._window = window
        with quiet(), _failures("the DICOM file could not be read: it is truncated or not a DICOM Part 10 file"):
            declared = _meta_syntax(pydicom, data)
            if declared:  # before the dataset is parsed: pydicom inflates a Deflated one there, without a bound
                self._check_syntax(pydicom, declared)
            self.dataset = ds = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
            syntax = str(getattr(ds.get("file_meta"), "TransferSyntaxUID", "") or "")
            if not syntax:
                raise InvalidImage("the DICOM file has no transfer syntax (file meta information): send it as a "
                                   "DICOM Part 10 file (with its 128-byte preamble and DICM)")
            if "PixelData" not in ds:
                other = next((k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
                raise UnprocessableImage(
                    f"the DICOM object has {other} (float pixels), which this server does not read" if other else
                    "the DICOM object has no pixel data (e.g. a structured report or a SEG): send an image")
            self.syntax = syntax
            self._check_syntax(pydicom, syntax)
            rows, columns = _whole(ds, "Rows"), _whole(ds, "Columns")
            self.samples = _whole(ds, "SamplesPerPixel", 1)
            self.bits = _whole(ds, "BitsAllocated")
            self.frames = _whole(ds, "NumberOfFrames", 1)
            self.photometric = str(ds.get("PhotometricInterpretation", "") or "")
        if self.photometric not in MONOCHROME + COLOUR:
            raise UnsupportedMediaType(f"the DICOM photometric interpretation {self.photometric[:20]!r} is not "
                                       f"read; send one of: {', '.join(MONOCHROME + COLOUR)}")
        if self.frames > limits.max_frames:
            raise LimitExceeded(f"the DICOM object has {self.frames} frames; the limit is {limits.max_frames} "
                                "(max_frames): send fewer frames per request")
        if rows * columns > limits.max_pixels:
            raise ImageTooLarge(f"the DICOM frames are {columns}x{rows} = {rows * columns} pixels; the limit is "
                                f"{limits.max_pixels} pixels (max_pixels)")
        if rows * columns * self.frames > limits.max_pixels:
            raise ImageTooLarge(f"the DICOM object's {self.frames} frames of {columns}x{rows} are "
                                f"{rows * columns * self.frames} pixels; the limit is {limits.max_pixels} pixels "
                                "(max_pixels, all frames together): send fewer frames per request")
        self.width, self.height = columns, rows
        stored = max(1, self.bits // 8) * self.samples
        if syntax in UNCOMPRESSED:
            need = (rows * columns * self.samples * self.frames * self.bits + 7) // 8
            have = len(ds.PixelData)
            if have < need:
                raise InvalidImage(f"the DICOM pixel data is truncated: {have} bytes, its header needs {need} "
                                   f"({self.frames} frames of {columns}x{rows}, {self.samples} samples of "
                                   f"{self.bits} bits)")
        # The stored pixels of every frame (pydicom decodes the object at once), and one frame's working copies.
        self.decode_bytes = stored * self.frames + FRAME_BYTES

    @staticmethod
    def _check_syntax(pydicom, syntax: str) -> None:
        name = pydicom.uid.UID(syntax).name
        if syntax not in ALLOWED_SYNTAXES:
            raise UnsupportedMediaType(f"the DICOM transfer syntax {name} ({syntax[:64]}) is not read by this server; "
                                       "send the file uncompressed (Explicit VR Little Endian) or as RLE, JPEG, "
                                       "JPEG-LS, JPEG 2000 or HTJ2K")
        if syntax not in UNCOMPRESSED and not pydicom.pixels.get_decoder(syntax).is_available:
            raise UnsupportedMediaType(f"the DICOM transfer syntax {name} ({syntax}) needs a decoder this server "
                                       "lacks: install segserve's 'medical' extra (pylibjpeg and its plugins), or "
                                       "send the file uncompressed")

    def images(self) -> list[Image.Image]:
        """Each frame windowed to an 8-bit RGB image, the model's input."""
        pixels = require("pydicom.pixels")
        ds = self.dataset
        with quiet(), _failures("the DICOM pixel data could not be decoded: it is truncated or corrupt"):
            stored = ds.pixel_array  # YBR converted to RGB by pydicom
            if self.frames == 1:
                stored = stored[None]
            if stored.shape[:3] != (self.frames, self.height, self.width):
                raise InvalidImage(f"the DICOM pixel data decoded to {stored.shape[1:3]} per frame, not the "
                                   f"{self.height}x{self.width} its header gives")
            if self.photometric in MONOCHROME:
                frames = self._grey(pixels, stored)
            elif self.photometric == "PALETTE COLOR":
                colour = pixels.apply_color_lut(stored, ds)
                bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
                frames = [to_8bit(frame, bits) for frame in colour]
            else:
                frames = [to_8bit(frame, int(ds.get("BitsStored", self.bits))) for frame in stored]
        return [Image.fromarray(frame).convert("RGB") for frame in frames]

    def _grey(self, pixels, stored: np.ndarray) -> list[np.ndarray]:
        """Monochrome frames through their modality transform and VOI window (an enhanced object's per frame)."""
        ds = self.dataset
        values = [pixels.apply_rescale(frame, _frame_item(ds, index, "PixelValueTransformationSequence"))
                  for index, frame in enumerate(stored)]
        if isinstance(self._window, Window):
            chosen = [(self._window, LINEAR)] * self.frames
        else:
            chosen = [_file_window(_frame_item(ds, index, "FrameVOILUTSequence")) for index in range(self.frames)]
            if any(window is None for window, _ in chosen) and "VOILUTSequence" not in ds:
                # No window in the file: the object's own range of modality values, the same for every frame.
                low = min(float(v.min()) for v in values)
                high = max(float(v.max()) for v in values)
                chosen = [(range_window(low, high), LINEAR_EXACT)] * self.frames
        frames = []
        for frame, (window, function) in zip(values, chosen, strict=True):
            if window is None:  # the file's VOI LUT table
                lut = pixels.apply_voi_lut(frame, ds, prefer_lut=True)
                grey = to_8bit(lut, int(ds.VOILUTSequence[0].LUTDescriptor[2]))
            else:
                grey = apply_window(frame, window, function)
            frames.append(255 - grey if self.photometric == "MONOCHROME1" else grey)
        return frames


def _frame_item(ds, index: int, sequence: str):
    """Where frame `index`'s attributes of a functional group are: its per-frame group, the shared one, or (a
    single-frame or legacy object) the dataset itself."""
    for groups, at in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        found = items[at].get(sequence) if items is not None and len(items) > at else None
        if found:
            return found[0]
    return ds


def _file_window(item) -> tuple[Window | None, str]:
    """The window a dataset (or functional group item) gives, with its VOI function; None without one."""
    if "WindowCenter" not in item or "WindowWidth" not in item:
        return None, LINEAR
    center, width = _first(item.WindowCenter), _first(item.WindowWidth)
    function = str(item.get("VOILUTFunction", LINEAR) or LINEAR).upper()
    if np.isfinite(center) and np.isfinite(width) and width >= 1 and function in FUNCTIONS:
        return Window(center, width), function
    raise UnprocessableImage("the DICOM window (Window Center, Window Width, VOI LUT Function) is not one this "
                             "server reads; send a window=center,width option")


def _meta_syntax(pydicom, data: bytes) -> str:
    """The transfer syntax the file meta information (group 0002, after the preamble) names, read alone."""
    if data[128:132] != b"DICM":
        return ""
    stream = io.BytesIO(data)
    stream.seek(132)
    meta = pydicom.filereader.read_dataset(stream, is_implicit_VR=False, is_little_endian=True,
                                           stop_when=lambda tag, vr, length: tag.group != 2)
    return str(meta.get("TransferSyntaxUID", "") or "")


def _first(value) -> float:
    """The first of a multi-valued window (several windows offered: the first is the default one)."""
    return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)


def _whole(ds, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    try:
        number = int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < 1:
        raise UnprocessableImage(f"the DICOM image has no valid {keyword}: a required image attribute")
    return number


@contextmanager
def quiet() -> Iterator[None]:
    """pydicom's and highdicom's warnings are not shown: they may quote a dataset value (a patient's name)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextmanager
def _failures(message: str) -> Iterator[None]:
    """Any library failure -> InvalidImage(message), naming only the exception's type (its text may quote
    dataset values)."""
    try:
        yield
    except RequestError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a broken file
        raise InvalidImage(f"{message} ({type(exc).__name__})") from None
