"""build_mar.sh / segserve.tools.build: archives that are known to work, and clear refusals."""

import subprocess
import zipfile

import pytest
import torch
import yaml
from safetensors.torch import save_file
from support import REPO
from support.handlers import archive_doc

from segserve.config import ServingConfig
from segserve.families import build_model
from segserve.tools.build import ARCHIVER_ONLY_FLAGS, BuildError, build, check_model, main

SMALL = {"base_channels": 4, "depth": 2}


@pytest.fixture()
def small_model_dir(tmp_path):
    """A model dir like model/, with a tiny random U-Net."""
    doc = yaml.safe_load((REPO / "model" / "model-config.yaml").read_text())
    doc["handler"]["model"]["arch_params"] = SMALL
    (tmp_path / "model-config.yaml").write_text(yaml.safe_dump(doc))
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in build_model("unet", 3, **SMALL).state_dict().items()},
              str(tmp_path / "segmenter.safetensors"))
    return tmp_path


def test_archive_holds_handler_package_weights_and_config(small_model_dir, tmp_path):
    mar = build("segmenter", small_model_dir / "model-config.yaml", small_model_dir / "segmenter.safetensors",
                tmp_path / "store")
    names = set(zipfile.ZipFile(mar).namelist())
    assert {"segmenter_handler.py", "weights.safetensors", "model-config.yaml",
            "segserve/__init__.py", "segserve/pipeline.py", "segserve/families.py", "MAR-INF/MANIFEST.json"} <= names
    # The class names live in model-config.yaml only (no index_to_name.json nobody reads).
    assert "index_to_name.json" not in names
    assert not any("__pycache__" in n for n in names)
    # Idempotent: building again replaces the archive.
    again = build("segmenter", small_model_dir / "model-config.yaml", small_model_dir / "segmenter.safetensors",
                  tmp_path / "store")
    assert again == mar and zipfile.ZipFile(again).testzip() is None


def test_mismatched_state_dict_is_refused_with_the_keys_listed(small_model_dir, tmp_path):
    state = build_model("unet", 5, **SMALL).state_dict()  # 5 classes, config says 3
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "wrong.safetensors"))
    config = ServingConfig.from_yaml(small_model_dir / "model-config.yaml")
    with pytest.raises(BuildError, match="shape mismatches") as info:
        check_model(config, tmp_path / "wrong.safetensors")
    assert "3 classes" in str(info.value)
    state = build_model("unet", 3, **SMALL).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state[next(iter(state))]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "keys.safetensors"))
    with pytest.raises(BuildError, match=r"(?s)missing keys.*unexpected keys.*extra\.weight"):
        check_model(config, tmp_path / "keys.safetensors")


def test_pickled_code_is_never_executed(small_model_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    config = ServingConfig.from_yaml(small_model_dir / "model-config.yaml")
    with pytest.raises(BuildError, match="cannot read weights"):
        check_model(config, tmp_path / "evil.pt")
    assert not marker.exists()


def test_build_mar_sh_missing_input_exits_nonzero_with_message(tmp_path):
    result = subprocess.run([str(REPO / "build_mar.sh"), "--weights", str(tmp_path / "none.safetensors"),
                             "--export-path", str(tmp_path / "store")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "weights not found" in result.stderr and "none.safetensors" in result.stderr
    assert not (tmp_path / "store" / "segmenter.mar").exists()


def test_build_mar_sh_refuses_to_overwrite_an_archive_without_force(small_model_dir, tmp_path, capsys):
    store = tmp_path / "store"
    store.mkdir()
    (store / "cells.mar").write_bytes(b"an archive built earlier")
    common = ["--config", str(small_model_dir / "model-config.yaml"),
              "--weights", str(small_model_dir / "segmenter.safetensors"), "--export-path", str(store)]
    assert main(["--name", "cells", *common]) == 2
    error = capsys.readouterr().err
    assert "cells.mar exists" in error and "-f/--force" in error
    assert (store / "cells.mar").read_bytes() == b"an archive built earlier"
    assert main(["--name", "cells", "--force", *common]) == 0
    assert "model-config.yaml" in zipfile.ZipFile(store / "cells.mar").namelist()


def test_build_mar_sh_takes_the_archivers_flag_names(small_model_dir, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "roads.mar").write_bytes(b"old")
    assert main(["--model-name", "roads", "--serialized-file", str(small_model_dir / "segmenter.safetensors"),
                 "--config-file", str(small_model_dir / "model-config.yaml"), "--export-path", str(store),
                 "--version", "2.0", "-f"]) == 0
    doc = archive_doc(store / "roads.mar")
    assert (doc["handler"]["model"]["name"], doc["handler"]["model"]["version"]) == ("roads", "2.0")


@pytest.mark.parametrize("flag", list(ARCHIVER_ONLY_FLAGS))
def test_archiver_flags_without_an_equivalent_are_refused_naming_ours(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([flag, "x"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert f"{flag} is torch-model-archiver's" in error and ARCHIVER_ONLY_FLAGS[flag] in error


def test_the_gpu_profile_sets_larger_batches(tmp_path):
    model = REPO / "model"
    mar = build("gpu", model / "model-config.yaml", model / "segmenter.safetensors", tmp_path, profile="gpu")
    doc = archive_doc(mar)
    assert (doc["batchSize"], doc["maxBatchDelay"], doc["handler"]["tiling"]["batch"]) == (32, 10, 16)
    assert doc["handler"]["tiling"]["overlap"] == 0.25  # the rest of the section kept
