"""`segserve` CLI: --version, predict (streamed, recursive, folder structure, resume, areas CSV, Ctrl-C), models,
exit codes. Against a small local HTTP server that segments like segserve would (a pixel brighter than 127 is
class 1) and describes its model on a management path; the integration tests use the real TorchServe."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.http_fakes import Answering, form_fields, loopback, serving

from segserve.client import __version__
from segserve.client import cli as cli_module
from segserve.client.cli import AREAS_CSV, main
from segserve.tools.synthetic import generate_scene

CLASSES = [{"id": 0, "name": "background", "color": [0, 0, 0]}, {"id": 1, "name": "bright", "color": [255, 0, 0]}]


def _png(mask: np.ndarray) -> bytes:
    image = Image.fromarray(mask, "P")
    image.putpalette([0, 0, 0, 255, 0, 0])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Segmenting(Answering):
    """POST /predictions/<model>[/<version>]: png or json of (gray > 127), invalid_image for what Pillow cannot
    read, invalid_option for a format other than png/json/overlay. GET /models...: a TorchServe-like describe."""

    paths: list[str] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        type(self).paths.append(self.path)
        fields = form_fields(self.headers["Content-Type"], self.read_body())
        parts = {name: content for name, (_, content) in fields.items()}
        asked = parts.get("format", b"png").decode()
        if asked not in ("png", "json", "overlay"):
            refusal = f"format={asked!r} is not supported; use one of: json, overlay, png"
            return self.send_json(400, {"code": 400, "type": "invalid_option", "message": refusal})
        try:
            image = Image.open(io.BytesIO(parts["data"])).convert("L")
        except OSError:
            return self.send_json(400, {"code": 400, "type": "invalid_image", "message": "cannot decode the image"})
        mask = (np.asarray(image) > 127).astype(np.uint8)
        if asked == "png":
            return self.send_body(200, "image/png", _png(mask))
        if asked == "overlay":
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG")
            return self.send_body(200, "image/jpeg", buffer.getvalue())
        classes = [{"id": c["id"], "name": c["name"], "pixels": int((mask == c["id"]).sum()),
                    "fraction": float((mask == c["id"]).mean())} for c in CLASSES]
        self.send_json(200, {"width": mask.shape[1], "height": mask.shape[0], "classes": classes,
                             "mask_format": "png;base64"})

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/models?"):
            return self.send_json(200, {"models": [{"modelName": "segmenter", "modelUrl": "segmenter.mar"}]})
        if self.path.startswith("/models/segmenter"):
            described = {"modelName": "segmenter", "modelVersion": "1.0", "batchSize": 4,
                         "workers": [{"id": "9000", "status": "READY"}]}
            if "customized=true" in self.path and "/all" not in self.path:  # as TorchServe: one version at a time
                described["customizedMetadata"] = json.dumps({"head": "softmax", "classes": CLASSES})
            return self.send_json(200, [described])
        self.send_json(404, {"code": 404, "type": "ResourceNotFoundException", "message": "not found"})


@pytest.fixture()
def fake(monkeypatch, tmp_path):
    for name in ("SEGSERVE_URL", "SEGSERVE_TOKEN", "SEGSERVE_MANAGEMENT_TOKEN", "SEGSERVE_KEY_FILE",
                 "SEGSERVE_MANAGEMENT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    Segmenting.paths = []
    with serving(loopback(Segmenting)) as url:
        yield ["--url", url, "--token", "t", "--management-url", url, "--management-token", "m", "--no-progress"]


def picture(path: Path, seed: int, size=(20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def scans(root: Path) -> list[Path]:
    """scans/a/x.png, scans/b/c/y.tif, scans/top.png (lossless: the test counts their pixels) and a text file."""
    made = [picture(root / "scans" / "a" / "x.png", 1), picture(root / "scans" / "b" / "c" / "y.tif", 2),
            picture(root / "scans" / "top.png", 3)]
    (root / "scans" / "notes.txt").write_text("not an image")
    return made


def read_areas(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_version_is_the_programs_and_model_version_is_its_own_flag(fake, capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"segserve {__version__}"
    picture(Path("img.png"), 4)
    assert main(["predict", "img.png", "--model-version", "2.0", *fake]) == 0
    assert Segmenting.paths[-1] == "/predictions/segmenter/2.0"
    # The old spelling after a command still works, and says the new name.
    assert main(["predict", "img.png", "--version", "3.0", "--overwrite", *fake]) == 0
    assert Segmenting.paths[-1] == "/predictions/segmenter/3.0"
    assert "use --model-version 3.0" in capsys.readouterr().err


def test_help_documents_the_exit_codes(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for code in ("0 ", "1 ", "2 ", "130"):
        assert f"  {code}" in text
    assert main(["predict", "--help"]) == 0
    assert "130" in capsys.readouterr().out and main([]) == 2


def test_predict_is_recursive_keeps_the_structure_and_writes_the_areas(fake, tmp_path, capsys):
    images = scans(tmp_path)
    assert main(["predict", "scans", "--out", "masks", *fake]) == 0
    written = sorted(str(p.relative_to(tmp_path / "masks")) for p in (tmp_path / "masks").rglob("*.png"))
    assert written == ["a/x.png", "b/c/y.png", "top.png"]
    assert "3 of 3 segmented into masks/" in capsys.readouterr().out
    rows = read_areas(tmp_path / "masks" / AREAS_CSV)
    assert {r["image"] for r in rows} == {str(p.relative_to(tmp_path)) for p in images}
    for row in rows:  # the pixels of each class, as the written mask has them, named from the model's description
        mask = np.asarray(Image.open(tmp_path / "masks" / row["output"]))
        assert int(row["pixels"]) == int((mask == int(row["class_id"])).sum()) > 0
        assert row["class"] == CLASSES[int(row["class_id"])]["name"]


def test_predict_skips_what_is_done_and_overwrite_redoes_it(fake, tmp_path, capsys):
    scans(tmp_path)
    assert main(["predict", "scans", *fake]) == 0
    sent = len(Segmenting.paths)
    rows = read_areas(tmp_path / "masks" / AREAS_CSV)
    (tmp_path / "masks" / "top.png").unlink()
    assert main(["predict", "scans", *fake]) == 0
    assert len(Segmenting.paths) == sent + 1  # only the missing one
    assert "1 of 1 segmented into masks/ (2 already there, skipped" in capsys.readouterr().out
    again = read_areas(tmp_path / "masks" / AREAS_CSV)
    assert sorted(map(str, rows), key=str) == sorted(map(str, again), key=str)  # kept rows + the redone image's
    assert main(["predict", "scans", "--overwrite", *fake]) == 0
    assert len(Segmenting.paths) == sent + 4
    assert len(read_areas(tmp_path / "masks" / AREAS_CSV)) == len(rows)


def test_an_output_folder_inside_the_input_is_not_an_input(fake, tmp_path):
    scans(tmp_path)
    assert main(["predict", ".", "--out", "scans/masks", *fake]) == 0
    sent = len(Segmenting.paths)
    assert main(["predict", ".", "--out", "scans/masks", "--overwrite", *fake]) == 0
    assert len(Segmenting.paths) == 2 * sent == 6


def test_a_failed_image_is_named_and_the_others_are_written(fake, tmp_path, capsys):
    scans(tmp_path)
    (tmp_path / "scans" / "broken.png").write_bytes(b"not a png")
    assert main(["predict", "scans", *fake]) == 1
    captured = capsys.readouterr()
    assert "3 of 4 segmented into masks/; 1 failed:" in captured.out
    assert "scans/broken.png: 400 invalid_image: cannot decode the image" in captured.err
    assert not (tmp_path / "masks" / "broken.png").exists() and (tmp_path / "masks" / "top.png").exists()


def test_an_option_the_server_refuses_is_a_usage_error_and_writes_nothing(fake, tmp_path, capsys):
    scans(tmp_path)
    assert main(["predict", "scans", "--format", "gif", "--workers", "1", *fake]) == 2
    assert "segserve predict: format='gif' is not supported; use one of: json, overlay, png" in capsys.readouterr().err
    assert len(Segmenting.paths) == 1 and not (tmp_path / "masks").exists()


def test_formats_without_areas_get_no_csv_and_say_why(fake, tmp_path, capsys):
    picture(tmp_path / "img.png", 5)
    assert main(["predict", "img.png", "--format", "overlay", *fake]) == 0
    assert (tmp_path / "masks" / "img.jpg").is_file() and not (tmp_path / "masks" / AREAS_CSV).exists()
    assert f"no {AREAS_CSV}: a overlay answer has no per-class areas; ask for format='json'" in capsys.readouterr().err
    assert main(["predict", "img.png", "--format", "json", "--out", "js", *fake]) == 0
    assert [int(r["pixels"]) for r in read_areas(tmp_path / "js" / AREAS_CSV)] == [
        c["pixels"] for c in json.loads((tmp_path / "js" / "img.json").read_text())["classes"]]


def test_ctrl_c_keeps_what_was_written_and_a_rerun_continues(fake, tmp_path, monkeypatch, capsys):
    scans(tmp_path)
    real_write, calls = cli_module._write, []

    def interrupted_on_the_second(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(cli_module, "_write", interrupted_on_the_second)
    assert main(["predict", "scans", "--workers", "1", *fake]) == 130
    assert "interrupted: 1 written into masks/" in capsys.readouterr().err
    done = [p for p in (tmp_path / "masks").rglob("*.png")]
    assert len(done) == 1 and not list((tmp_path / "masks").rglob("*.partial"))
    rows = read_areas(tmp_path / "masks" / AREAS_CSV)
    assert {r["output"] for r in rows} == {done[0].relative_to(tmp_path / "masks").as_posix()}
    monkeypatch.setattr(cli_module, "_write", real_write)
    sent = len(Segmenting.paths)
    assert main(["predict", "scans", *fake]) == 0
    assert len(Segmenting.paths) == sent + 2 and len(list((tmp_path / "masks").rglob("*.png"))) == 3
    assert len({r["image"] for r in read_areas(tmp_path / "masks" / AREAS_CSV)}) == 3


def test_models_lists_what_is_served(fake, capsys):
    assert main(["models", *[a for a in fake if a != "--no-progress"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "version", "workers", "batch", "head", "classes"]
    assert lines[1].split() == ["segmenter", "1.0", "1/1", "4", "softmax", "background,bright"]
    assert main(["models", "--json", *[a for a in fake if a != "--no-progress"]]) == 0
    (described,) = json.loads(capsys.readouterr().out)
    assert described["customizedMetadata"]["classes"] == CLASSES  # parsed from TorchServe's string


def test_models_without_a_management_api_says_how_to_name_it(fake, capsys):
    assert main(["models", "--url", "http://127.0.0.1:9", "--token", "t"]) == 1
    assert "--management-url" in capsys.readouterr().err


def test_a_missing_path_or_key_file_is_a_usage_error(fake, capsys):
    assert main(["predict", "nowhere.png", *fake]) == 2
    assert "no such file or folder: nowhere.png" in capsys.readouterr().err
    picture(Path("img.png"), 6)
    assert main(["predict", "img.png", "--key-file", "nope.json", "--url", fake[1]]) == 2
    assert "key file not found: nope.json" in capsys.readouterr().err


# -- integration: the real TorchServe ----------------------------------------------------------------------
def _scene_folder(root: Path, names: tuple[str, ...] = ("one.png", "sub/two.png", "three.png"),
                  seed: int = 310) -> Path:
    """root/in holding a synthetic scene at each name (seeds seed, seed + 1, ...)."""
    for i, name in enumerate(names):
        (root / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(generate_scene(seed + i, (64, 80))[0]).save(root / "in" / name)
    return root / "in"


def _predict_keys(server) -> list[str]:
    """predict's options to ask the real TorchServe, without a progress bar."""
    return ["--url", server.inference_url, "--key-file", str(server.workdir / "key_file.json"), "--no-progress"]


@pytest.mark.integration
def test_predict_a_folder_and_list_the_models_against_torchserve(server, tmp_path, capsys):
    folder = _scene_folder(tmp_path, ("one.png", "sub/two.png"), seed=300)
    keys = ["--url", server.inference_url, "--management-url", server.management_url,
            "--key-file", str(server.workdir / "key_file.json")]
    out = tmp_path / "out"
    assert main(["predict", str(folder), "--format", "json", "--out", str(out), "--no-progress", *keys]) == 0
    rows = read_areas(out / AREAS_CSV)
    for name in ("one", "sub/two"):
        answer = json.loads((out / f"{name}.json").read_text())
        mine = {int(r["class_id"]): (r["class"], int(r["pixels"])) for r in rows if r["output"] == f"{name}.json"}
        assert mine == {c["id"]: (c["name"], c["pixels"]) for c in answer["classes"]}
    assert main(["models", *keys]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert any(line.split()[:2] == ["segmenter", "1.0"] and "background,cell,nucleus" in line for line in listed)


def _served_masks(server, folder: Path) -> dict[str, np.ndarray]:
    from segserve.client import SegservClient

    client = SegservClient(server.inference_url, key_file=server.workdir / "key_file.json")
    return {p.relative_to(folder).as_posix(): client.predict(p, format="png").mask()
            for p in sorted(folder.rglob("*.png"))}


def read_cvat_masks(folder: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """A CVAT "Segmentation mask 1.1" folder read back as CVAT's importer (datumaro's VOC segmentation reader)
    does: labelmap.txt's `name:r,g,b:parts:actions` lines (blank and `#` lines skipped) give the labels in order,
    each SegmentationClass/<name>.png is read as RGB and every pixel's colour becomes the index of the label of
    that colour; ImageSets/Segmentation/default.txt lists the items."""
    labels = []
    for line in (folder / "labelmap.txt").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, color, *_ = line.split(":")
        labels.append((name, tuple(int(c) for c in color.split(","))))
    assert len({color for _, color in labels}) == len(labels), "a colour names two labels"
    masks = {}
    for item in (folder / "ImageSets" / "Segmentation" / "default.txt").read_text().split():
        rgb = np.asarray(Image.open(folder / "SegmentationClass" / f"{item}.png").convert("RGB"))
        index = np.full(rgb.shape[:2], -1)
        for label, (_, color) in enumerate(labels):
            index[(rgb == color).all(-1)] = label
        assert (index >= 0).all(), f"{item}: a colour no label has"
        masks[item] = index
    return [name for name, _ in labels], masks


@pytest.mark.integration
def test_predict_writes_a_coco_dataset_that_pycocotools_loads(server, tmp_path, capsys):
    from pycocotools.coco import COCO

    folder = _scene_folder(tmp_path)
    keys = _predict_keys(server)
    dataset, answers = tmp_path / "cells.json", tmp_path / "answers"
    assert main(["predict", str(folder), "--coco", str(dataset), "--out", str(answers), *keys]) == 0
    assert "wrote COCO dataset" in capsys.readouterr().out
    served = _served_masks(server, folder)
    coco = COCO(str(dataset))
    assert sorted(image["file_name"] for image in coco.dataset["images"]) == sorted(served)
    assert {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())} == {1: "cell", 2: "nucleus"}
    ids = [a["id"] for a in coco.dataset["annotations"]]
    assert len(ids) == len(set(ids))
    for image in coco.dataset["images"]:
        mask = served[image["file_name"]]
        assert (image["height"], image["width"]) == mask.shape
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert sorted(a["category_id"] for a in annotations) == [c for c in (1, 2) if (mask == c).any()]
        for annotation in annotations:
            assert np.array_equal(coco.annToMask(annotation).astype(bool), mask == annotation["category_id"])
            assert annotation["area"] == (mask == annotation["category_id"]).sum() and annotation["iscrowd"] == 1
    # Resumable: an answer lost is asked again, the others are read back from --out; the same dataset.
    before = json.loads(dataset.read_text())
    (answers / "sub" / "two.json").unlink()
    assert main(["predict", str(folder), "--coco", str(dataset), "--out", str(answers), *keys]) == 0
    assert "1 of 1 segmented" in capsys.readouterr().out
    assert json.loads(dataset.read_text()) == before


@pytest.mark.integration
def test_predict_writes_a_cvat_segmentation_mask_export_that_reads_back(server, tmp_path, capsys):
    folder = _scene_folder(tmp_path)
    keys = _predict_keys(server)
    export = tmp_path / "cvat"
    assert main(["predict", str(folder), "--cvat", str(export), *keys]) == 0
    labels, masks = read_cvat_masks(export)
    assert labels == ["background", "cell", "nucleus"]  # in class id order: label index = class id
    served = _served_masks(server, folder)
    assert sorted(masks) == sorted(name.removesuffix(".png") for name in served)
    for name, mask in served.items():
        assert np.array_equal(masks[name.removesuffix(".png")], mask)
    assert main(["predict", str(folder), "--cvat", str(export), "--format", "png", *keys]) == 2
    assert "--cvat is built from format=json answers" in capsys.readouterr().err


@pytest.mark.integration
def test_predict_a_folder_of_dicom_and_nifti(server, tmp_path, capsys):
    """DICOM and .nii.gz files are found in a folder; the answer's own suffix names each output (.nii.gz whole)."""
    import gzip

    from segserve.tools.medical_samples import write_samples

    write_samples(tmp_path / "in")
    keys = _predict_keys(server)
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "in"), "--format", "nifti", "--out", str(out), "--no-csv", *keys]) == 1
    assert (out / "volume.nii.gz").is_file() and gzip.decompress((out / "volume.nii.gz").read_bytes())[:4]
    assert "ct.dcm" in capsys.readouterr().err  # a DICOM asked for a NIfTI answer: refused, named
    assert main(["predict", str(tmp_path / "in" / "ct.dcm"), "--format", "png", "--window", "file", "--out",
                 str(out), *keys]) == 0
    assert np.asarray(Image.open(out / "ct.png")).shape == (256, 256)
