"""DICOM files and NIfTI volumes written by pydicom and nibabel from the synthetic scenes (segserve.tools.synthetic),
with known ground truth: the tests, docs/medical.md's figures and examples send these.

The scene's grey image (Pillow's luminance of its RGB) is stored as 16-bit modality values through a rescale
slope and intercept, with the window that maps them back onto the scene's own 8-bit grey levels exactly: the
model sees, windowed, what the grey PNG of the scene shows (`grey_scene`).
"""

from __future__ import annotations

import argparse
import gzip
import io
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .synthetic import generate_scene

# Stored = grey * GAIN + OFFSET; modality value (HU) = stored * SLOPE + INTERCEPT.
GAIN, OFFSET, SLOPE, INTERCEPT = 16, 100, 0.5, -1024.0
# The window whose LINEAR function (PS3.3 C.11.2.1.2.1) maps the scene's HU back onto 0..255:
# its lower edge at grey 0's value, and width - 1 = 255 steps of grey's HU.
_LOW, _STEP = OFFSET * SLOPE + INTERCEPT, GAIN * SLOPE
WINDOW_WIDTH = 255 * _STEP + 1
WINDOW_CENTER = _LOW + 0.5 + (WINDOW_WIDTH - 1) / 2
PATIENT_NAME = "Sample^Patient^Known"  # what the privacy tests look for in the logs


def grey_scene(seed: int, size: tuple[int, int] = (256, 256)) -> tuple[np.ndarray, np.ndarray]:
    """(grey uint8 (H, W), truth uint8 (H, W)) of one synthetic scene."""
    image, truth = generate_scene(seed, size)
    return np.asarray(Image.fromarray(image).convert("L")), truth


def to_hu(grey: np.ndarray) -> np.ndarray:
    """8-bit grey -> the stored uint16 values whose modality values the sample window maps back onto it."""
    return (grey.astype(np.uint16) * GAIN + OFFSET).astype(np.uint16)


def scene_dicom(seeds: Sequence[int] = (0,), size: tuple[int, int] = (256, 256), *, patient_name: str = PATIENT_NAME,
                window: bool = True, photometric: str = "MONOCHROME2", syntax: str | None = None,
                pixels: np.ndarray | None = None) -> tuple[bytes, np.ndarray]:
    """A DICOM file of the scenes' grey images and their truth (frames, H, W): a CT Image for one seed, for more
    an enhanced multi-frame CT (highdicom's legacy conversion of the slices' series, one frame per seed).
    `window`: write the sample window into the file; `photometric` MONOCHROME1 stores the inverted values;
    `syntax` compresses the pixel data with pydicom's encoders (e.g. RLE Lossless); `pixels` replaces the stored
    values (tests of odd files)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    greys, truths = zip(*(grey_scene(seed, size) for seed in seeds), strict=True)
    grey = np.stack(greys)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    stored = to_hu(grey) if pixels is None else pixels
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    slices = []
    for index, frame in enumerate(stored):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")  # CT Image
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, "PID-9731", "19700101", "O"
        ds.PatientAddress, ds.OtherPatientIDs = "1 Sample Street", "OTHER-77"
        ds.InstitutionName, ds.OperatorsName, ds.ReferringPhysicianName = "Sample Clinic", "Operator^Sample", "R^D"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "ACC123", "S1"
        ds.SeriesDate, ds.SeriesTime, ds.ContentDate, ds.ContentTime = "20260101", "120000", "20260101", "120000"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, index + 1
        # The CT Image IOD's type 2 and 2C attributes that dciodvfy asks for (present, possibly empty).
        ds.Laterality, ds.PatientPosition, ds.AcquisitionNumber = "", "HFS", 1
        ds.Manufacturer, ds.KVP, ds.PositionReferenceIndicator = "segserve samples", 120, ""
        ds.add_new(0x00090010, "LO", "SAMPLE PRIVATE")  # a private block, which no answer may carry
        ds.add_new(0x00091001, "LO", patient_name)
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 2.0 * index], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 2.0
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Rows, ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = SLOPE, INTERCEPT, "HU"
        if window:
            ds.WindowCenter, ds.WindowWidth = WINDOW_CENTER, WINDOW_WIDTH
        ds.PixelData = frame.astype("<u2").tobytes()
        slices.append(ds)
    if len(slices) == 1:
        ds = slices[0]
    else:
        from highdicom.legacy import LegacyConvertedEnhancedCTImage

        ds = LegacyConvertedEnhancedCTImage(slices, series_instance_uid=generate_uid(), series_number=2,
                                            sop_instance_uid=generate_uid(), instance_number=1)
        ds.add_new(0x00090010, "LO", "SAMPLE PRIVATE")
        ds.add_new(0x00091001, "LO", patient_name)
        ds.Laterality = ""  # the conversion drops it
        # The conversion orders the frames by position: the truth follows (seed i lies at z = 2 i).
        order = [round(float(group.PlanePositionSequence[0].ImagePositionPatient[2]) / 2.0)
                 for group in ds.PerFrameFunctionalGroupsSequence]
        truths = [truths[index] for index in order]
    if syntax is not None:
        ds.compress(syntax)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue(), np.stack(truths)


def scene_nifti(seeds: Sequence[int] = (0, 1, 2), size: tuple[int, int] = (256, 256), *, compressed: bool = True,
                cal: bool = True) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A NIfTI-1 volume (i, j, k) of the scenes' grey images as slices along k (slice k's image: rows along j,
    columns along i), in HU through scl_slope and scl_inter, with the sample window as cal_min..cal_max
    (`cal`); its affine; and the truth volume (i, j, k)."""
    import nibabel

    greys, truths = zip(*(grey_scene(seed, size) for seed in seeds), strict=True)
    stored = np.stack([to_hu(g).T for g in greys], axis=-1)  # (i, j, k)
    truth = np.stack([t.T for t in truths], axis=-1)
    affine = np.array([[0.5, 0, 0, -64], [0, 0.5, 0, -64], [0, 0, 2.0, 10], [0, 0, 0, 1]])
    image = nibabel.Nifti1Image(stored.astype(np.int16), affine)
    image.header.set_slope_inter(SLOPE, INTERCEPT)
    if cal:
        # cal_min..cal_max: the grey levels 0 and 255 in HU (LINEAR_EXACT's edges).
        image.header["cal_min"], image.header["cal_max"] = _LOW, _LOW + 255 * _STEP
    image.header["descrip"] = b"sample volume"
    data = image.to_bytes()
    return (gzip.compress(data, mtime=0) if compressed else data), affine, truth


SAMPLES = {"ct.dcm": "one CT slice (16-bit, rescaled, windowed)", "ct-volume.dcm": "an enhanced CT of 3 frames",
           "volume.nii.gz": "a NIfTI volume of 3 slices along k"}


def write_samples(folder: Path, seed: int = 7) -> list[Path]:
    """The sample files docs/medical.md sends, written into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"ct.dcm": scene_dicom((seed,))[0], "ct-volume.dcm": scene_dicom((seed, seed + 1, seed + 2))[0],
             "volume.nii.gz": scene_nifti((seed, seed + 1, seed + 2))[0]}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write sample DICOM and NIfTI files of synthetic scenes: "
                                     + "; ".join(f"{name}: {what}" for name, what in SAMPLES.items()))
    parser.add_argument("--out", type=Path, default=Path("."), help="folder to write them into (default: here)")
    parser.add_argument("--seed", type=int, default=7, help="the first scene's seed")
    args = parser.parse_args(argv)
    for path in write_samples(args.out, args.seed):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
