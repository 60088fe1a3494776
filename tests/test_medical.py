"""DICOM and NIfTI in, DICOM SEG and NIfTI label volumes out (segserve.medical, docs/medical.md), on files written by
pydicom and nibabel from the synthetic scenes (segserve.tools.medical_samples): windowing gives the model exactly the
grey scene, every photometric and transfer syntax read answers what the grey PNG answers, the SEG reads back
(highdicom, pydicom) equal to the served PNG masks, bad files get their own 4xx and the batch goes on, and no
patient or study value reaches an error body or a log. In-process through the handler; the served tests share one
TorchServe whose archive carries a `medical:` section."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image
from support import MODEL, MODEL_CONFIG, REPO, encode_image, miou, run_block, torchserve
from support.handlers import ask
from test_docs import examples

from segserve.config import ConfigError, ServingConfig
from segserve.medical import open_source
from segserve.metrics import PIXELS
from segserve.options import Options
from segserve.pipeline import Segmenter
from segserve.tools.build import build
from segserve.tools.inprocess import Request, handle
from segserve.tools.medical_samples import (
    INTERCEPT,
    PATIENT_NAME,
    SLOPE,
    WINDOW_CENTER,
    WINDOW_WIDTH,
    grey_scene,
    scene_dicom,
    scene_nifti,
    to_hu,
)

pydicom = pytest.importorskip("pydicom", reason="segserve's 'medical' extra")
highdicom = pytest.importorskip("highdicom")
nibabel = pytest.importorskip("nibabel")

DICOM = {"body": {"content-type": "application/dicom"}}
SEEDS = (3, 8, 21)


def png_of(array: np.ndarray) -> bytes:
    return encode_image(Image.fromarray(array))


def mask_of(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)))


def answer(handler, data: bytes, fmt: str = "png", **options: str):
    fields = {"format": fmt.encode(), **{k: v.encode() for k, v in options.items()}}
    return ask(handler, {"body": data, **fields}, DICOM if data[128:132] == b"DICM" else {})


def read_seg(body: bytes):
    return highdicom.seg.segread(io.BytesIO(body))


def seg_labels(seg, source: pydicom.Dataset, frames: int) -> np.ndarray:
    """(frames, H, W) class ids read back from a SEG by highdicom (segment n = class n: all classes asked)."""
    if frames == 1:
        return seg.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=True)
    return seg.get_pixels_by_source_frame(source.SOPInstanceUID, list(range(1, frames + 1)), combine_segments=True)


# -- input: what the model sees -------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [
    {}, {"photometric": "MONOCHROME1"},
    {"syntax": "1.2.840.10008.1.2.5"},  # RLE Lossless (pydicom's own codec)
    {"syntax": "1.2.840.10008.1.2.4.80"},  # JPEG-LS Lossless (pyjpegls)
    {"syntax": "1.2.840.10008.1.2.4.90"},  # JPEG 2000 Lossless (pylibjpeg-openjpeg)
], ids=["plain", "monochrome1", "rle", "jpeg-ls", "jpeg2000"])
def test_a_windowed_16_bit_dicom_answers_what_the_grey_png_does(handler, variant):
    data, _ = scene_dicom((SEEDS[0],), **variant)
    grey, _ = grey_scene(SEEDS[0])
    served = answer(handler, data)
    assert served.status == 200, served.body
    assert np.array_equal(mask_of(served.body), mask_of(answer(handler, png_of(grey)).body))


def test_the_window_comes_from_the_request_a_preset_or_else_the_range(handler):
    grey, _ = grey_scene(SEEDS[1])
    expected = mask_of(answer(handler, png_of(grey)).body)
    bare, _ = scene_dicom((SEEDS[1],), window=False)
    assert np.array_equal(mask_of(answer(handler, bare, window=f"{WINDOW_CENTER},{WINDOW_WIDTH}").body), expected)
    assert np.array_equal(mask_of(answer(handler, bare, window="samples").body), expected)  # model-config preset
    # Without a window anywhere: the image's own range, which is not the training window here.
    # (LINEAR_EXACT over the modality values' range, PS3.3 C.11.2.1.3.2)
    hu = to_hu(grey) * SLOPE + INTERCEPT
    low, high = hu.min(), hu.max()
    ranged = np.rint(((hu - (low + high) / 2) / (high - low) + 0.5) * 255).astype(np.uint8)
    assert np.array_equal(mask_of(answer(handler, bare).body), mask_of(answer(handler, png_of(ranged)).body))
    # The request's window wins over the file's.
    windowed, _ = scene_dicom((SEEDS[1],))
    narrow = answer(handler, windowed, window="40,80")
    assert narrow.status == 200 and not np.array_equal(mask_of(narrow.body), expected)
    for bad in ("40", "40,0", "brain", "nan,400"):
        reply = answer(handler, windowed, window=bad)
        assert reply.status == 400 and "window" in json.loads(reply.body)["message"], bad


def test_rgb_and_palette_dicom_are_taken_as_colour(handler):
    image, _ = generate_colour(SEEDS[2])
    expected = mask_of(answer(handler, png_of(image)).body)
    rgb = colour_dicom(image)
    assert np.array_equal(mask_of(answer(handler, rgb).body), expected)
    # The same colours through a palette (an exact one: the image's 256 most common colours are all it has).
    indexed = Image.fromarray(image).quantize(256, method=Image.Quantize.MAXCOVERAGE)
    palette = np.asarray(indexed.convert("RGB"))
    served = answer(handler, palette_dicom(np.asarray(indexed), indexed.getpalette()[:768]))
    assert served.status == 200, served.body
    assert np.array_equal(mask_of(served.body), mask_of(answer(handler, png_of(palette)).body))


def test_a_jpeg_baseline_ybr_dicom_decodes_as_pillow_decodes_its_jpeg(config):
    """JPEG Baseline (pylibjpeg-libjpeg) in YBR_FULL_422, converted to RGB by pydicom: the colours Pillow gives
    the same JPEG (two decoders: within a grey level or two, never a colour shift)."""
    from pydicom.encaps import encapsulate

    image, _ = generate_colour(SEEDS[0])
    encoded = encode_image(Image.fromarray(image), "JPEG", quality=90, subsampling="4:2:2")
    ds = pydicom.dcmread(io.BytesIO(colour_dicom(image)))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = encapsulate([encoded])
    ds["PixelData"].VR = "OB"
    frame = np.asarray(open_source("dicom", to_bytes(ds), config, Options()).images()[0], np.int16)
    assert np.abs(frame - np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"), np.int16)).mean() < 1.0


def test_the_overlay_of_a_dicom_is_drawn_on_the_windowed_image(handler):
    data, _ = scene_dicom((SEEDS[0],))
    grey, _ = grey_scene(SEEDS[0])
    overlay = answer(handler, data, "overlay")
    assert overlay.content_type == "image/jpeg"
    assert overlay.body == answer(handler, png_of(np.stack([grey] * 3, axis=-1)), "overlay").body


# -- answers: DICOM SEG, NIfTI, slices -----------------------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 3])
def test_the_seg_reads_back_equal_to_the_png_masks(handler, config, frames):
    seeds = SEEDS[:frames]
    data, _ = scene_dicom(seeds)
    source = pydicom.dcmread(io.BytesIO(data))
    reply = answer(handler, data, "dicom-seg")
    assert (reply.status, reply.content_type) == (200, "application/dicom")
    seg = read_seg(reply.body)
    # Each frame's mask: the PNG answer of that frame's windowed grey image, alone.
    order = [round(float(g.PlanePositionSequence[0].ImagePositionPatient[2]) / 2) for g in
             source.PerFrameFunctionalGroupsSequence] if frames > 1 else [0]
    expected = np.stack([mask_of(answer(handler, png_of(grey_scene(seeds[i])[0])).body) for i in order])
    assert np.array_equal(seg_labels(seg, source, frames), expected)
    # highdicom: a binary segment per class but the background, named and coded from model-config.yaml
    assert seg.SegmentationType == "BINARY" and seg.number_of_segments == config.num_classes - 1
    for number, segment in enumerate(seg.SegmentSequence, start=1):
        name = config.classes[number].name
        code = config.classes[number].segment_code
        assert segment.SegmentLabel == name
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == code.type[0]
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == code.category[0]
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        shown = highdicom.color.CIELabColor.from_dicom_value(segment.RecommendedDisplayCIELabValue).to_rgb()
        assert np.abs(np.subtract(shown, config.classes[number].color)).max() <= 2
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        source.SOPInstanceUID
    # pydicom alone: one bit plane per frame and segment
    plain = pydicom.dcmread(io.BytesIO(reply.body))
    assert plain.pixel_array.reshape(-1, *expected.shape[1:]).shape[0] == frames * (config.num_classes - 1)


DCIODVFY = shutil.which("dciodvfy")


def dciodvfy(path: Path) -> list[str]:
    """What David Clunie's DICOM validator (Debian's dicom3tools) finds against the standard's IODs."""
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith(("Error", "Warning"))]


@pytest.mark.skipif(DCIODVFY is None, reason="no dciodvfy on the PATH (Debian: apt-get install dicom3tools)")
@pytest.mark.parametrize("fmt", ["dicom-seg", "dicom-seg-fractional"])
@pytest.mark.parametrize("frames", [1, 3])
def test_the_seg_is_valid_by_the_standard_s_validator(handler, tmp_path, fmt, frames):
    data, _ = scene_dicom(SEEDS[:frames])
    reply = answer(handler, data, fmt)
    assert reply.status == 200, reply.body
    (tmp_path / "seg.dcm").write_bytes(reply.body)
    assert dciodvfy(tmp_path / "seg.dcm") == []  # no error, not even a warning
    # The validator does find a fault: the same SEG without its segments' description.
    broken = pydicom.dcmread(io.BytesIO(reply.body))
    del broken.SegmentSequence
    broken.save_as(tmp_path / "broken.dcm")
    assert any("SegmentSequence" in line for line in dciodvfy(tmp_path / "broken.dcm"))


def test_a_multi_frame_dicom_answers_every_frame_and_only_volume_formats(handler):
    data, _ = scene_dicom(SEEDS)
    png = answer(handler, data, "png")
    assert png.status == 400 and "3 frames" in json.loads(png.body)["message"]
    assert "dicom-seg" in json.loads(png.body)["message"]
    seen = len(handler.context.metrics.named(PIXELS))
    slices = answer(handler, data, "slices")
    assert slices.content_type == "application/zip"
    source = pydicom.dcmread(io.BytesIO(data))
    assert [m.value for m in handler.context.metrics.named(PIXELS)[seen:]] == [3 * source.Rows * source.Columns]
    with zipfile.ZipFile(io.BytesIO(slices.body)) as archive:
        names = archive.namelist()
        masks = [mask_of(archive.read(name)) for name in names]
    assert names == ["slice_0000.png", "slice_0001.png", "slice_0002.png"]
    seg = read_seg(answer(handler, data, "dicom-seg").body)
    assert np.array_equal(seg_labels(seg, source, 3), np.stack(masks))


def test_a_fractional_seg_holds_the_probabilities(handler, config):
    data, _ = scene_dicom((SEEDS[0],))
    reply = answer(handler, data, "dicom-seg-fractional", classes="cell,nucleus")
    seg = read_seg(reply.body)
    assert seg.SegmentationType == "FRACTIONAL" and seg.number_of_segments == 2
    source = pydicom.dcmread(io.BytesIO(data))
    fractions = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1, 2],
                                                  rescale_fractional=True)[0]
    probs = np.load(io.BytesIO(answer(handler, data, "probs", classes="cell,nucleus").body))
    assert np.abs(fractions - np.moveaxis(probs.astype(np.float32), 0, -1)).max() <= 1 / 255 + 1e-3


def test_a_nifti_volume_answers_a_label_volume_with_its_affine_and_header(handler):
    data, affine, truth = scene_nifti(SEEDS)
    reply = answer(handler, data, "nifti")
    assert (reply.status, reply.content_type) == (200, "application/gzip"), reply.body
    labels = nibabel.Nifti1Image.from_bytes(gzip.decompress(reply.body))
    source = nibabel.Nifti1Image.from_bytes(gzip.decompress(data))
    assert np.allclose(labels.affine, affine) and labels.shape == truth.shape
    assert np.allclose(labels.header.get_zooms(), source.header.get_zooms())
    for key in ("qform_code", "sform_code", "xyzt_units", "dim_info"):
        assert labels.header[key] == source.header[key], key
    assert labels.header.get_data_dtype() == np.uint8 and labels.header["intent_code"] == 1002
    assert b"sample" not in labels.header["descrip"].tobytes()  # free text is not carried over
    volume = np.asarray(labels.dataobj)
    # Slice k is the grey scene k (rows along j): its mask is the grey PNG's.
    for k, seed in enumerate(SEEDS):
        assert np.array_equal(volume[:, :, k].T, mask_of(answer(handler, png_of(grey_scene(seed)[0])).body))
    assert np.mean([miou(volume[:, :, k], truth[:, :, k]) for k in range(3)]) > 0.3
    # Along another axis (a small volume: each slice is a model input): 24 slices of 16x2, the same shape back.
    small, _, small_truth = scene_nifti(SEEDS[:2], (16, 24))
    across = answer(handler, small, "nifti", axis="0")
    assert across.status == 200, across.body
    across_volume = np.asarray(nibabel.Nifti1Image.from_bytes(gzip.decompress(across.body)).dataobj)
    assert across_volume.shape == small_truth.shape == (24, 16, 2)
    # Slice i of axis 0 is the (j, k) plane: its mask answers that plane's image (rows along k).
    plane = answer(handler, small, "slices", axis="0")
    with zipfile.ZipFile(io.BytesIO(plane.body)) as archive:
        assert np.array_equal(mask_of(archive.read("slice_0005.png")), across_volume[5].T)
    assert answer(handler, scene_nifti(SEEDS, compressed=False)[0], "nifti").body == reply.body


def test_a_nifti_2_volume_and_a_gzip_that_inflates_past_its_voxels(handler):
    data, affine, truth = scene_nifti(SEEDS[:2], compressed=False)
    one = nibabel.Nifti1Image.from_bytes(data)
    two = nibabel.Nifti2Image(one.dataobj.get_unscaled(), one.affine)
    two.header.set_slope_inter(SLOPE, INTERCEPT)
    two.header["cal_min"], two.header["cal_max"] = one.header["cal_min"], one.header["cal_max"]
    reply = answer(handler, two.to_bytes(), "nifti")
    assert reply.status == 200, reply.body
    labels = nibabel.Nifti2Image.from_bytes(gzip.decompress(reply.body))
    assert labels.shape == truth.shape and np.allclose(labels.affine, affine)
    assert np.array_equal(np.asarray(labels.dataobj), np.asarray(nibabel.Nifti1Image.from_bytes(
        gzip.decompress(answer(handler, data, "nifti").body)).dataobj))
    # 100 MB of zeros after the voxels (a 100 KB gzip): only the bytes the header needs are inflated.
    bomb = gzip.compress(data + bytes(100_000_000), compresslevel=9)
    assert len(bomb) < 1_000_000
    config = handler.segmenter.config
    tracemalloc.start()
    source = open_source("nifti", bomb, config, Options())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert source.frames == 2 and peak < 10 * len(data)  # the voxels' bytes, not the 100 MB after them
    assert answer(handler, bomb, "nifti").body == answer(handler, data, "nifti").body


# -- bad input: a 4xx of its own ------------------------------------------------------------------------------
def no_pixels() -> bytes:
    data, _ = scene_dicom((0,))
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.PixelData
    return to_bytes(ds)


def with_syntax(uid: str) -> bytes:
    """The sample with its pixel data encapsulated and its file meta naming `uid` (the dataset itself left plain)."""
    from pydicom.encaps import encapsulate
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds = pydicom.dcmread(io.BytesIO(scene_dicom((0,))[0]))
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = uid
    stream = DicomBytesIO()
    stream.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(stream, ds.file_meta, enforce_standard=True)
    stream.is_little_endian, stream.is_implicit_VR = True, False
    write_dataset(stream, ds)
    return stream.getvalue()


def nifti_with(**fields) -> bytes:
    data, _, _ = scene_nifti((0,), (32, 32), compressed=False)
    header = nibabel.Nifti1Header.from_fileobj(io.BytesIO(data[:348]), check=False)
    for key, value in fields.items():
        header[key] = value
    return header.binaryblock + data[348:]


BAD = {
    "truncated": (lambda: scene_dicom((0,))[0][:20_000], 400, "truncated"),
    "not dicom after DICM": (lambda: b"\x00" * 128 + b"DICM" + b"\x07" * 300, 400, "Part 10"),
    "no pixel data": (no_pixels, 422, "no pixel data"),
    "mpeg2 syntax": (lambda: with_syntax("1.2.840.10008.1.2.4.100"), 415, "MPEG2"),
    "deflated syntax": (lambda: with_syntax("1.2.840.10008.1.2.1.99"), 415, "Deflated"),
    "nifti truncated": (lambda: scene_nifti((0,), (32, 32))[0][:200], 400, "truncated"),
    "nifti 4-D": (lambda: nifti_with(dim=[4, 32, 32, 1, 5, 1, 1, 1]), 422, "4-D"),
    "nifti zero dim": (lambda: nifti_with(dim=[3, 32, 0, 1, 1, 1, 1, 1]), 422, "implausible"),
    "nifti nan pixdim": (lambda: nifti_with(pixdim=[1, np.nan, 1, 1, 1, 1, 1, 1]), 422, "not finite"),
    "nifti complex": (lambda: nifti_with(datatype=32, bitpix=64), 422, "datatype"),
}


def to_bytes(ds) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_file_gets_its_own_4xx_and_the_batch_goes_on(handler, name):
    make, status, words = BAD[name]
    good, _ = scene_dicom((SEEDS[0],))
    replies = handle(handler, [Request({"body": good, "format": b"png"}, DICOM),
                               Request({"body": make(), "format": b"png"}, DICOM if "nifti" not in name else {}),
                               Request({"body": good, "format": b"dicom-seg"}, DICOM)])
    assert [reply.status for reply in replies] == [200, status, 200], replies[1].body
    error = json.loads(replies[1].body)
    assert error["code"] == status and words.lower() in error["message"].lower(), error
    assert PATIENT_NAME.split("^")[0] not in replies[1].body.decode()


def test_limits_are_checked_from_the_header(reference, config):
    limits = dataclasses.replace(config.limits, max_frames=2, max_pixels=3 * 256 * 256 - 1)
    segmenter = Segmenter(dataclasses.replace(config, limits=limits), reference.model)
    volume, _ = scene_dicom(SEEDS)
    nifti, _, _ = scene_nifti(SEEDS)
    for data in (volume, nifti):
        batch = segmenter.prepare([{"body": data, "format": b"slices"}], [DICOM if data[128:132] == b"DICM" else {}],
                                  [None])
        error = batch.errors[0]
        assert error.status == 413 and "max_frames" in error.message
    more_frames = dataclasses.replace(limits, max_frames=5)
    segmenter = Segmenter(dataclasses.replace(config, limits=more_frames), reference.model)
    batch = segmenter.prepare([{"body": volume, "format": b"slices"}], [DICOM], [None])
    assert batch.errors[0].status == 413 and "max_pixels" in batch.errors[0].message


def test_a_worker_without_the_extra_answers_415_naming_it(handler, monkeypatch):
    data, _ = scene_dicom((0,))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    reply = answer(handler, data)
    assert reply.status == 415 and "'medical' extra" in json.loads(reply.body)["message"]
    assert answer(handler, png_of(grey_scene(0)[0])).status == 200


def test_window_and_axis_are_refused_where_they_do_not_apply(handler):
    reply = answer(handler, png_of(grey_scene(0)[0]), window="40,400")
    assert reply.status == 400 and "DICOM and NIfTI" in json.loads(reply.body)["message"]
    reply = answer(handler, scene_dicom((0,))[0], axis="1")
    assert reply.status == 400 and "NIfTI volume" in json.loads(reply.body)["message"]


def test_a_format_for_dicom_refuses_other_input(handler):
    reply = answer(handler, png_of(grey_scene(0)[0]), "dicom-seg")
    assert reply.status == 400 and "DICOM" in json.loads(reply.body)["message"]
    reply = answer(handler, scene_nifti((0,))[0], "dicom-seg")
    assert reply.status == 400 and "NIFTI" in json.loads(reply.body)["message"]


def test_no_patient_value_reaches_a_log_or_an_error(handler, caplog):
    caplog.set_level(logging.DEBUG)
    good, _ = scene_dicom((SEEDS[0],))
    bodies = [answer(handler, make()).body for make, _, _ in BAD.values()]
    bodies += [answer(handler, good, fmt).body for fmt in ("png", "json", "dicom-seg", "overlay")]
    text = caplog.text + "".join(body.decode("latin-1") for body in bodies[:len(BAD)])
    for value in (PATIENT_NAME, "Sample^Patient", "PID-9731", "ACC123", "Sample Clinic", "19700101"):
        assert value not in text, value


def test_the_seg_carries_only_what_the_standard_requires_of_the_source(handler):
    data, _ = scene_dicom((SEEDS[0],))
    seg = pydicom.dcmread(io.BytesIO(answer(handler, data, "dicom-seg").body))
    source = pydicom.dcmread(io.BytesIO(data))
    assert not any(element.tag.is_private for element in seg)
    for keyword in ("InstitutionName", "OperatorsName", "PatientAddress", "OtherPatientIDs"):
        assert keyword in source and keyword not in seg, keyword
    # Patient and General Study modules (type 1 and 2: required of every SEG), copied by highdicom
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert seg[keyword].value == source[keyword].value, keyword


# -- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("medical, words", [
    ({"window": "lung"}, "preset"), ({"window": [40, 0]}, "width >= 1"), ({"slice_axis": 3}, "0, 1 or 2"),
    ({"windows": "file"}, "window"), ({"presets": {"lung": [-600]}}, "center, width"),
])
def test_the_medical_section_is_read_strictly(medical, words):
    section = yaml.safe_load(MODEL_CONFIG.read_text())["handler"]
    with pytest.raises(ConfigError, match=words):
        ServingConfig.from_dict({**section, "medical": medical})


def test_class_codes_are_read_strictly_and_default_to_a_local_one():
    section = yaml.safe_load(MODEL_CONFIG.read_text())["handler"]
    with pytest.raises(ConfigError, match=r"classes\[1\]\.code must be \[code value, coding scheme, meaning\]"):
        ServingConfig.from_dict({**section, "classes": [{"name": "background"}, {"name": "a", "code": [1, "SCT"]}]})
    plain = ServingConfig.from_dict({**section, "classes": ["background", "lesion"]})
    assert plain.classes[1].segment_code.type == ("lesion", "99SEGSERVE", "lesion")
    assert plain.classes[1].segment_code.category == ("91723000", "SCT", "Anatomical Structure")


# -- served by a real TorchServe ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def medical_server(tmp_path_factory):
    """One TorchServe serving the default model's archive (its model-config.yaml has the `medical:` section)."""
    root = tmp_path_factory.mktemp("medical")
    store = root / "model-store"
    build(MODEL, MODEL_CONFIG, REPO / "model" / ServingConfig.from_yaml(MODEL_CONFIG).weights, store)
    with torchserve(root, store, [f"{MODEL}={MODEL}.mar"], [MODEL]) as ts:
        yield ts


def post(server, data: bytes, fmt: str, content_type: str = "application/dicom", **fields) -> requests.Response:
    url = f"{server.inference_url}/predictions/{MODEL}/1.0/{fmt}"
    headers = server.headers()
    if fields:
        return requests.post(url, files={"data": ("file", data, content_type)}, data=fields, headers=headers,
                             timeout=120)
    return requests.post(url, data=data, headers={**headers, "Content-Type": content_type}, timeout=120)


@pytest.mark.integration
def test_served_dicom_equals_in_process_and_the_png_miou(medical_server, handler):
    """The default model's mIoU on windowed 16-bit DICOM equals that on the PNG of the same scene (the same masks),
    served equals in-process, and the served SEG holds the served PNG masks."""
    scores = {"dicom": [], "png": []}
    for seed in SEEDS:
        data, truth = scene_dicom((seed,))
        grey, _ = grey_scene(seed)
        served = post(medical_server, data, "png")
        assert served.status_code == 200, served.text
        as_png = post(medical_server, png_of(grey), "png", "image/png")
        scores["dicom"].append(miou(mask_of(served.content), truth[0]))
        scores["png"].append(miou(mask_of(as_png.content), truth[0]))
        assert served.content == answer(handler, data).body
        seg = post(medical_server, data, "dicom-seg")
        assert seg.headers["Content-Type"].startswith("application/dicom")
        source = pydicom.dcmread(io.BytesIO(data))
        assert np.array_equal(seg_labels(read_seg(seg.content), source, 1)[0], mask_of(served.content))
    assert scores["dicom"] == scores["png"] and np.mean(scores["dicom"]) > 0.3


@pytest.mark.integration
def test_served_volumes_and_bad_files_and_no_patient_value_in_the_logs(medical_server, handler):
    volume, _ = scene_dicom(SEEDS)
    seg = post(medical_server, volume, "dicom-seg")
    assert seg.status_code == 200, seg.text
    source = pydicom.dcmread(io.BytesIO(volume))
    in_process = read_seg(answer(handler, volume, "dicom-seg").body)
    assert np.array_equal(seg_labels(read_seg(seg.content), source, 3), seg_labels(in_process, source, 3))
    nifti, _, _ = scene_nifti(SEEDS)
    labels = post(medical_server, nifti, "nifti", "application/gzip")
    assert labels.status_code == 200 and labels.content == answer(handler, nifti, "nifti").body
    window = post(medical_server, scene_dicom((SEEDS[0],), window=False)[0], "png", window="samples")
    assert window.content == answer(handler, scene_dicom((SEEDS[0],))[0]).body
    for name, (make, status, _) in BAD.items():
        reply = post(medical_server, make(), "png", "application/dicom" if "nifti" not in name else "application/gzip")
        assert reply.status_code == status, (name, reply.text)
    assert post(medical_server, volume, "dicom-seg").status_code == 200  # the worker lives on
    logs = "".join(path.read_text(errors="replace") for path in medical_server.log_dir.glob("*.log*")
                   if path.is_file())
    assert "segserve batch" in logs  # the worker's log is there to search
    for value in (PATIENT_NAME, "Sample^Patient", "PID-9731", "ACC123", "Sample Clinic"):
        assert value not in logs, value


@pytest.mark.integration
def test_the_docs_examples_run_as_written(medical_server, tmp_path):
    """docs/medical.md's blocks, in order in one folder (the first writes the sample files the others send),
    against the served archive; each must exit 0 and print what its test comment says."""
    blocks = examples(REPO / "docs" / "medical.md")
    assert len(blocks) >= 7
    env = dict(os.environ, SEGSERVE_URL=medical_server.inference_url,
               SEGSERVE_TOKEN=medical_server.keys()["inference"], PYTHONPATH=str(REPO / "src"),
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    for block in blocks:
        lang, code, expected = block.values
        result = run_block(code, tmp_path, env, timeout=180, lang=lang)
        assert result.returncode == 0, (block.id, result.stderr[-2000:])
        for text in expected:
            assert text in result.stdout, (block.id, text, result.stdout[-1500:])


# -- sample builders for colour DICOM -------------------------------------------------------------------------
def generate_colour(seed: int):
    from segserve.tools.synthetic import generate_scene

    return generate_scene(seed)


def colour_dicom(image: np.ndarray) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(scene_dicom((0,))[0]))
    for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth"):
        del ds[keyword]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = image.tobytes()
    return to_bytes(ds)


def palette_dicom(indices: np.ndarray, palette: list[int]) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(colour_dicom(np.zeros((256, 256, 3), np.uint8))))
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "PALETTE COLOR"
    del ds.PlanarConfiguration
    entries = np.asarray(palette, np.uint16).reshape(-1, 3) * 257  # 16-bit LUT entries
    for index, colour in enumerate(("Red", "Green", "Blue")):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [len(entries), 0, 16])
        ds[f"{colour}PaletteColorLookupTableDescriptor"].VR = "US"
        setattr(ds, f"{colour}PaletteColorLookupTableData", entries[:, index].astype("<u2").tobytes())
    ds.PixelData = indices.astype(np.uint8).tobytes()
    return to_bytes(ds)


# The constants the samples rest on: the window maps grey 0 and 255 onto the LINEAR function's edges.
def test_the_sample_window_maps_the_stored_values_back_onto_the_grey():
    from segserve.config import Window
    from segserve.medical.window import apply_window

    grey = np.arange(256, dtype=np.uint8)
    values = to_hu(grey) * SLOPE + INTERCEPT
    assert np.array_equal(apply_window(values, Window(WINDOW_CENTER, WINDOW_WIDTH)), grey)
