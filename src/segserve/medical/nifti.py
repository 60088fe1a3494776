"""A NIfTI volume (.nii, .nii.gz; nibabel) -> checked header -> windowed 8-bit RGB slices; label volume -> NIfTI.

1. the header (the first 540 bytes, decompressed alone for .nii.gz) is checked before any voxel is read: one
   3-D volume (a 4-D series is refused), plausible dimensions, voxel sizes, affine and scaling, slices
   (`max_frames`) and voxels (`max_pixels`, the whole volume); then only the bytes it needs are decompressed,
   so a gzip that inflates past them costs nothing more;
2. the volume is cut along `axis` into 2-D slices (slice n's image: rows along the next axis, columns along
   the other), each through the window (the request's, the model's preset, or the file's own: cal_min..cal_max,
   else the volume's range) to the 8-bit grey image the model sees;
3. the label volume answers with the input's affine and header (qform and sform kept), as uint8 labels with
   intent LABEL; its free-text fields (descrip, aux_file) are not carried over.
"""

from __future__ import annotations

import gzip
import io
import zlib

import numpy as np
from PIL import Image

from ..config import ServingConfig, Window
from ..errors import ImageTooLarge, InvalidImage, LimitExceeded, UnprocessableImage
from . import NIFTI, NIFTI_HEADER_BYTES, check_body, require
from .dicom import quiet
from .window import LINEAR, LINEAR_EXACT, apply_window, range_window

NIFTI1_BYTES = 348
VOLUME_BYTES = 4  # per voxel: the volume as float32 modality values (scl_slope and scl_inter applied)
SLICE_BYTES = 5  # per pixel of a slice: its 8-bit and RGB images
INTENT_LABEL = 1002  # NIFTI_INTENT_LABEL: voxel values are indices into a list of labels


def volume_bytes(config: ServingConfig) -> int:
    """Bytes per voxel a 3-D model's request holds at its peak: the float32 volume and its windowed copy, the
    model input (float32 per input channel), sliding_window_inference's output and weight map (float32 per output
    channel, and one), the labels and the answer's copies of them."""
    return VOLUME_BYTES + 1 + 4 * config.input_shape[0] + 4 * (config.out_channels + 1) + 5


class NiftiSource:
    """One NIfTI volume opened and checked (the constructor refuses what cannot be answered)."""

    kind = NIFTI

    def __init__(self, data: bytes, config: ServingConfig, window: str | Window, axis: int):
        limits = config.limits
        check_body(data, limits.max_bytes, "NIfTI file")
        nibabel = require("nibabel")
        compressed = data[:2] == b"\x1f\x8b"
        head = _inflate(data, NIFTI_HEADER_BYTES) if compressed else data[:NIFTI_HEADER_BYTES]
        version2 = head[:4] in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c")
        self._image_class = nibabel.Nifti2Image if version2 else nibabel.Nifti1Image
        header_class = nibabel.Nifti2Header if version2 else nibabel.Nifti1Header
        header_bytes = NIFTI_HEADER_BYTES if version2 else NIFTI1_BYTES
        if len(head) < header_bytes:
            raise InvalidImage("the NIfTI file is truncated: its header is incomplete")
        try:
            with quiet():  # nibabel warns about odd headers quoting their fields
                # The header alone: extensions (which may hold a whole DICOM header) are neither read nor answered.
                header = header_class.from_fileobj(io.BytesIO(head[:header_bytes]), check=False)
                shape = tuple(int(d) for d in header.get_data_shape())
                dtype = header.get_data_dtype()
                offset = int(header.get_data_offset())
                affine = header.get_best_affine()
                zooms = header.get_zooms()
                slope, inter = header.get_slope_inter()
        except Exception as exc:  # noqa: BLE001 - nibabel raises several kinds for a broken header
            raise UnprocessableImage(f"the NIfTI header is implausible ({type(exc).__name__}): check its dim, "
                                     "datatype and pixdim fields") from None
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) > 3:
            raise UnprocessableImage(f"the NIfTI image is {len(shape)}-D ({'x'.join(map(str, shape[:8]))}): send "
                                     "one 2-D or 3-D volume per request (e.g. one time point of a series)")
        if len(shape) < 2 or min(shape) < 1:
            raise UnprocessableImage(f"the NIfTI header's dimensions {shape} are implausible: a volume needs 2 or 3 "
                                     "dimensions of at least 1 voxel")
        if dtype.kind not in "uif" or dtype.itemsize > 8 or dtype.fields is not None:
            raise UnprocessableImage(f"the NIfTI datatype {dtype.name} is not read: send integer or floating-point "
                                     "voxels (not complex or RGB)")
        numbers = np.array([*np.ravel(affine), *zooms[:3], slope if slope is not None else 1.0,
                            inter if inter is not None else 0.0], dtype=np.float64)
        if not np.isfinite(numbers).all() or min(zooms[:len(shape)]) <= 0 or (slope is not None and slope == 0):
            raise UnprocessableImage("the NIfTI header's voxel sizes, affine or scaling (pixdim, srow, scl_slope) are "
                                     "not finite or not positive: fix the header")
        if len(shape) == 2:
            axis = 2
            shape = (*shape, 1)
        slices = shape[axis]
        across = [size for index, size in enumerate(shape) if index != axis]
        voxels = shape[0] * shape[1] * shape[2]
        if slices > limits.max_frames:
            raise LimitExceeded(f"the NIfTI volume has {slices} slices along axis {axis}; the limit is "
                                f"{limits.max_frames} (max_frames): send fewer slices per request")
        if voxels > limits.max_pixels:
            raise ImageTooLarge(f"the NIfTI volume {'x'.join(map(str, shape))} is {voxels} voxels; the limit is "
                                f"{limits.max_pixels} (max_pixels, the whole volume): send a smaller volume")
        memory = voxels * volume_bytes(config) if config.volume_roi is not None else 0
        if memory > limits.max_request_memory:
            raise LimitExceeded(f"segmenting this {'x'.join(map(str, shape))} volume with the 3-D model would need "
                                f"about {memory // 1_000_000} MB of memory; the limit is "
                                f"{limits.max_request_memory // 1_000_000} MB (max_request_memory): send a smaller "
                                "volume")
        if offset < header_bytes:
            raise UnprocessableImage(f"the NIfTI header's vox_offset {offset} is inside the header: fix the header")
        need = offset + voxels * dtype.itemsize
        raw = _inflate(data, need) if compressed else data
        if len(raw) < need:
            raise InvalidImage(f"the NIfTI file is truncated: {len(raw)} bytes, its header needs {need} "
                               f"({'x'.join(map(str, shape))} voxels of {dtype.name} from byte {offset})")
        self._raw = raw[:need]
        self.header = header
        self.shape = shape
        self.axis = axis
        self.frames = slices
        self.width, self.height = across  # a slice's image: columns along the first axis left, rows the second
        self._window = window
        self.decode_bytes = VOLUME_BYTES * slices + SLICE_BYTES

    def volume(self) -> np.ndarray:
        """The volume's modality values (float32, scl_slope and scl_inter applied), 3-D."""
        try:
            with quiet():
                image = self._image_class.from_bytes(self._raw)
                return np.asarray(image.get_fdata(dtype=np.float32)).reshape(self.shape)
        except Exception as exc:  # noqa: BLE001 - nibabel's reader failing on what its header promised
            raise InvalidImage(f"the NIfTI voxels could not be read ({type(exc).__name__})") from None

    def _window_of(self, volume: np.ndarray) -> tuple[Window, str]:
        """The request's window or the model's preset; else the file's own cal_min..cal_max, else its range."""
        if isinstance(self._window, Window):
            return self._window, LINEAR
        low, high = float(self.header["cal_min"]), float(self.header["cal_max"])
        if not (np.isfinite(low) and np.isfinite(high) and high > low):
            low, high = float(volume.min()), float(volume.max())
        return range_window(low, high), LINEAR_EXACT

    def windowed(self) -> np.ndarray:
        """The volume through its window, uint8 grey levels in its stored (i, j, k) order: a 3-D model's input."""
        volume = self.volume()
        window, function = self._window_of(volume)
        return np.stack([apply_window(piece, window, function) for piece in volume])  # a slice's float64 at a time

    def images(self) -> list[Image.Image]:
        volume = self.volume()
        window, function = self._window_of(volume)
        # (slices, first axis left, second axis left) -> each slice transposed: rows along the second.
        cut = np.moveaxis(volume, self.axis, 0)
        return [Image.fromarray(apply_window(piece.T, window, function)).convert("RGB") for piece in cut]

    def slices_of(self, labels: np.ndarray) -> list[np.ndarray]:
        """An (i, j, k) label volume as the per-slice (H, W) labels `answer` takes (the inverse of labels_volume)."""
        return [piece.T for piece in np.moveaxis(labels, self.axis, 0)]

    def labels_volume(self, labels: list[np.ndarray]) -> np.ndarray:
        """Per-slice (H, W) labels -> the volume's (i, j, k) shape, the inverse of `images`' cut."""
        return np.moveaxis(np.stack([piece.T for piece in labels]), 0, self.axis)

    def answer(self, labels: list[np.ndarray], config: ServingConfig) -> bytes:
        """A gzipped NIfTI of the label volume with the input's affine and header."""
        volume = self.labels_volume(labels).astype(np.uint8)
        header = self.header.copy()
        header.set_data_shape(volume.shape)
        image = self._image_class(volume, None, header=header)
        image.set_data_dtype(np.uint8)
        image.header.set_slope_inter(1.0, 0.0)
        image.header["cal_min"], image.header["cal_max"] = 0, config.num_classes - 1
        image.header["intent_code"] = INTENT_LABEL
        image.header["descrip"] = f"{config.name} {config.version} labels"[:79].encode()
        image.header["aux_file"] = b""
        return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def _inflate(data: bytes, size: int) -> bytes:
    """At most `size` bytes of a gzip body, inflated only that far (a gzip bomb costs nothing past them)."""
    try:
        return zlib.decompressobj(wbits=31).decompress(data, size)
    except zlib.error:
        raise InvalidImage("the .nii.gz is not a readable gzip stream: it is truncated or corrupt") from None
