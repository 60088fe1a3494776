"""3-D models for NIfTI volumes (docs/medical.md#3-d-models): an archive of a random-weight 3-D MONAI UNet, built by
segserve.tools.build, answers a NIfTI volume with the label volume MONAI's sliding_window_inference makes on the same
model and windowed volume, with the input's affine and shape; what is not a volume, or a format that answers 2-D
images, gets its clear 4xx. In-process through the archive's own handler."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from support import MODEL_CONFIG, encode_image, run_block
from support.handlers import archive_doc, ask, unpack, unpacked_handler

from segserve.config import ConfigError, ServingConfig
from segserve.families import build_model
from segserve.tools.build import BuildError, build
from segserve.tools.inprocess import load_handler

nibabel = pytest.importorskip("nibabel", reason="segserve's 'medical' extra")
inferers = pytest.importorskip("monai.inferers", reason="segserve's 'monai' extra")

CLASSES = ["background", "liver", "lesion"]
ROI = [16, 24, 24]  # the sliding window (D, H, W) along the volume's i, j, k
PARAMS = {"spatial_dims": 3, "channels": [4, 8], "strides": [2]}
SHAPE = (40, 30, 20)  # i, j, k: more than one window along i and j, one padded along k
CAL = (-200.0, 300.0)  # cal_min..cal_max: the file's own window


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("vol3d")
    torch.manual_seed(0)
    model = build_model("monai:UNet", len(CLASSES), **PARAMS)
    torch.save(model.state_dict(), root / "unet3d.pt")
    mar = build("unet3d", MODEL_CONFIG, root / "unet3d.pt", root / "store", arch="monai:UNet", arch_params=PARAMS,
                classes=CLASSES, input_size=ROI, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    return model.eval(), mar, unpack(mar, root / "unpacked")


@pytest.fixture(scope="module")
def handler(archive):
    return load_handler(archive[2])


def volume_nifti(seed: int = 0) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A .nii.gz of smooth random int16 values (HU-like) with an oblique affine; its values and affine."""
    rng = np.random.default_rng(seed)
    values = rng.normal(50, 150, SHAPE).cumsum(axis=0) / 4
    stored = np.clip(values, -1000, 1000).astype(np.int16)
    affine = np.array([[0.8, 0.1, 0, -30], [0, 0.8, 0, -20], [0, 0, 2.5, 5], [0, 0, 0, 1]])
    image = nibabel.Nifti1Image(stored, affine)
    image.header["cal_min"], image.header["cal_max"] = CAL
    return gzip.compress(image.to_bytes(), mtime=0), stored, affine


def send(handler, data: bytes, fmt: str = "nifti", **options: str):
    return ask(handler, {"body": data, "format": fmt.encode(), **{k: v.encode() for k, v in options.items()}})


def expected_labels(stored: np.ndarray, model, config: ServingConfig, roi, channels: int = 1):
    """What MONAI's own sliding_window_inference labels: the file's window (LINEAR_EXACT over cal_min..cal_max)
    to 0..1, repeated over the model's `channels` inputs. Its labels, and the voxels clear: those no float
    rounding (e.g. memory layout) can flip."""
    center, width = (CAL[0] + CAL[1]) / 2, CAL[1] - CAL[0]
    grey = np.clip(np.rint(((stored - center) / width + 0.5) * 255), 0, 255) / 255.0
    inputs = torch.from_numpy(grey).float()[None, None].repeat(1, channels, 1, 1, 1)
    with torch.inference_mode():
        logits = inferers.sliding_window_inference(inputs, roi, config.tiling.batch, model,
                                                   overlap=config.tiling.overlap, mode="gaussian")[0]
    top2 = logits.topk(2, dim=0).values
    return logits.argmax(0).numpy(), (top2[0] - top2[1]).numpy() > 1e-4


def test_the_archive_records_a_3d_model(archive):
    doc = archive_doc(archive[1])["handler"]
    assert doc["input"]["size"] == ROI and doc["model"]["arch_params"] == PARAMS
    config = ServingConfig.from_dict(doc)
    assert config.volume_roi == tuple(ROI) and config.input_shape == (1, *ROI)


def test_describe_shows_the_3d_window(handler):
    assert handler.describe_handle()["input_size"] == ROI


def test_a_volume_answers_what_sliding_window_inference_makes_with_its_affine(archive, handler):
    model, config = archive[0], handler.segmenter.config
    data, stored, affine = volume_nifti()
    reply = send(handler, data)
    assert reply.status == 200, reply.body[:500]
    labels = nibabel.Nifti1Image.from_bytes(gzip.decompress(reply.body))
    assert labels.shape == SHAPE and np.allclose(labels.affine, affine)
    assert labels.get_data_dtype() == np.uint8 and int(labels.header["intent_code"]) == 1002
    served = np.asarray(labels.dataobj)
    expected, clear = expected_labels(stored, model, config, ROI)
    assert clear.mean() > 0.99
    assert np.array_equal(served[clear], expected[clear])
    assert len(np.unique(expected)) > 1  # a model answering one class everywhere would prove nothing


@pytest.mark.parametrize("what", ["png", "dicom"])
def test_what_is_not_a_volume_gets_a_422_saying_the_model_segments_volumes(handler, what):
    image = encode_image(Image.fromarray(np.full((32, 32, 3), 90, np.uint8)))
    if what == "dicom":
        from segserve.tools.medical_samples import scene_dicom

        image = scene_dicom((0,))[0]
    reply = ask(handler, {"body": image}, {"body": {"content-type": "application/dicom"}} if what == "dicom" else {})
    assert reply.status == 422, reply.body[:300]
    message = json.loads(reply.body)["message"]
    assert "segments 3-D volumes" in message and "NIfTI" in message and "format=nifti" in message


def test_a_2d_format_for_a_volume_gets_a_406_naming_the_volume_format(handler):
    for fmt in ("png", "json", "slices"):
        reply = send(handler, volume_nifti()[0], fmt)
        assert reply.status == 406, (fmt, reply.body[:300])
        assert "format=nifti" in json.loads(reply.body)["message"]
    assert send(handler, volume_nifti()[0]).status == 200  # the worker goes on


def test_a_volume_over_the_memory_limit_is_refused_from_its_header(handler):
    config = handler.segmenter.config
    from segserve.medical.nifti import volume_bytes

    voxels = int(np.prod(SHAPE))
    assert voxels * volume_bytes(config) < config.limits.max_request_memory  # the sample is answered (above)
    big = nibabel.Nifti1Image(np.zeros((1, 1, 1), np.int16), np.eye(4))
    side = int((config.limits.max_request_memory / volume_bytes(config)) ** (1 / 3)) + 2
    big.header.set_data_shape((side, side, side))
    # The header alone (no voxels): refused before any is read.
    reply = send(handler, big.header.binaryblock + b"\0" * 4)
    assert reply.status == 413 and "max_request_memory" in json.loads(reply.body)["message"]


def test_2d_and_3d_settings_must_agree(tmp_path):
    torch.manual_seed(0)
    torch.save(build_model("monai:UNet", len(CLASSES), **PARAMS).state_dict(), tmp_path / "u.pt")
    with pytest.raises(BuildError, match="DEPTHxHEIGHTxWIDTH"):
        build("u", MODEL_CONFIG, tmp_path / "u.pt", tmp_path / "s", arch="monai:UNet", arch_params=PARAMS,
              classes=CLASSES, input_size=[32, 32])
    doc = yaml.safe_load(MODEL_CONFIG.read_text())["handler"]
    doc["input"]["size"] = ROI
    with pytest.raises(ConfigError, match="spatial_dims"):
        ServingConfig.from_dict(doc)


def test_options_a_volume_takes_and_those_it_refuses(handler):
    data = volume_nifti()[0]
    whole = np.asarray(nibabel.Nifti1Image.from_bytes(gzip.decompress(send(handler, data).body)).dataobj)
    # axis only says how slices are cut for a 2-D model: the 3-D model's labels do not depend on it.
    along_i = send(handler, data, axis="0")
    assert np.array_equal(np.asarray(nibabel.Nifti1Image.from_bytes(gzip.decompress(along_i.body)).dataobj), whole)
    only = send(handler, data, classes="lesion")
    kept = np.asarray(nibabel.Nifti1Image.from_bytes(gzip.decompress(only.body)).dataobj)
    assert np.array_equal(kept, np.where(whole == 2, 2, 0))
    for key, value in (("smooth", "2"), ("fill_holes", "true"), ("min_area", "5"), ("tile", "on")):
        reply = send(handler, data, **{key: value})
        assert reply.status == 400 and key in json.loads(reply.body)["message"], (key, reply.body[:300])
    v2 = ask(handler, {"body": {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}})
    assert v2.status == 422 and "segments 3-D volumes" in v2.body.decode()


def test_the_docs_build_example_runs_as_written(tmp_path):
    """docs/medical.md's 3-D build example, run as written in a copy of the project (as test_families_docs runs
    own-model.md's), builds the archive it says: a 3-D window, one input channel."""
    from support import REPO
    from test_families_docs import copy_project

    text = (REPO / "docs" / "medical.md").read_text()
    section = text[text.index("## 3-D models"):text.index("## Limits and bad input")]
    start = section.index("```bash\n") + len("```bash\n")
    code = section[start:section.index("\n```", start)]
    copy_project(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path / "src"),
                                                                    os.environ.get("PYTHONPATH")])))
    result = run_block(code, tmp_path, env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "built model-store/liver3d.mar" in result.stdout
    doc = archive_doc(tmp_path / "model-store" / "liver3d.mar")
    config = ServingConfig.from_dict(doc["handler"])
    assert config.volume_roi == (32, 64, 64) and config.input_shape == (1, 32, 64, 64)


@pytest.mark.integration
def test_served_by_torchserve_as_in_process(archive, handler, tmp_path):
    """The 3-D archive in a real TorchServe: a volume's label volume equals the in-process answer, an image gets the
    422 and a 2-D format the 406, and the worker answers on."""
    import requests
    from support import torchserve

    mar = archive[1]
    data = volume_nifti(seed=4)[0]
    with torchserve(tmp_path, mar.parent, [f"unet3d={mar.name}"], ["unet3d"]) as server:
        url = f"{server.inference_url}/predictions/unet3d"
        headers = {**server.headers(), "Content-Type": "application/gzip"}
        served = requests.post(f"{url}/1.0/nifti", data=data, headers=headers, timeout=120)
        assert served.status_code == 200, served.text
        assert served.content == send(handler, data).body
        image = encode_image(Image.fromarray(np.full((32, 32, 3), 90, np.uint8)))
        photo = requests.post(url, data=image, headers={**server.headers(), "Content-Type": "image/png"}, timeout=60)
        assert photo.status_code == 422 and "segments 3-D volumes" in photo.json()["message"]
        as_png = requests.post(f"{url}/1.0/png", data=data, headers=headers, timeout=60)
        assert as_png.status_code == 406 and "format=nifti" in as_png.json()["message"]
        assert requests.post(f"{url}/1.0/nifti", data=data, headers=headers, timeout=120).content == served.content


def test_a_model_of_several_input_channels_gets_the_volume_in_each(tmp_path):
    """arch_params.in_channels 2: the windowed volume repeated over both, as sliding_window_inference is given it."""
    params = {"spatial_dims": 3, "in_channels": 2, "features": [4, 4, 8, 8, 16, 4]}
    torch.manual_seed(1)
    model = build_model("monai:BasicUNet", 2, **params).eval()
    torch.save(model.state_dict(), tmp_path / "b.pt")
    mar = build("b3d", MODEL_CONFIG, tmp_path / "b.pt", tmp_path / "store", arch="monai:BasicUNet", arch_params=params,
                classes=["background", "organ"], input_size=[32, 32, 32], mean=[0.0] * 3, std=[1.0] * 3)
    handler = unpacked_handler(mar, tmp_path / "b3d")
    config = handler.segmenter.config
    assert config.input_shape == (2, 32, 32, 32)
    data, stored, _ = volume_nifti(seed=2)
    reply = send(handler, data)
    assert reply.status == 200, reply.body[:300]
    served = np.asarray(nibabel.Nifti1Image.from_bytes(gzip.decompress(reply.body)).dataobj)
    expected, clear = expected_labels(stored, model, config, [32, 32, 32], channels=2)
    assert clear.mean() > 0.99 and np.array_equal(served[clear], expected[clear])
