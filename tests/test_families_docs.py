"""docs/own-model.md's example of each model family, run as written, and each archive it builds segmenting an image.

The blocks marked `<!-- family-example -->` run in order in a copy of the project (its build_mar.sh, src,
handler and model/, with this venv), as a reader would run them from the project root; every archive they
write to model-store/ is then loaded as a TorchServe worker loads it (segserve.tools.inprocess) and asked
for a mask.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from support import REPO, encode_image, random_image, run_block

from segserve.tools.inprocess import Request, handle, load_handler

GUIDE = REPO / "docs" / "own-model.md"
EXAMPLE = re.compile(r"<!-- family-example -->\s*\n```bash\n(?P<code>.*?)```", re.S)
PROJECT_FILES = ["build_mar.sh", "src", "handler", "model"]
# What the examples must cover: one archive per family (the torchvision one is test_guide.py's).
FAMILIES = {"cells-smp": "smp:Unet", "cells-segformer": "hf", "cells-monai": "monai:UNet",
            "cells-export": "export", "cells-torchscript": "torchscript", "toy": "custom"}


def examples() -> list[str]:
    return [match["code"] for match in EXAMPLE.finditer(GUIDE.read_text())]


def copy_project(target: Path) -> None:
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target / name)
    (target / ".venv").symlink_to(Path(sys.executable).parent.parent)  # this venv, never reinstalled


def test_each_family_example_builds_an_archive_that_segments(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    copy_project(project)
    # PYTHONPATH: the copy's segserve for every step (the venv's own install may be another checkout's).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(project / "src"),
                                                                    os.environ.get("PYTHONPATH")])))
    blocks = examples()
    assert len(blocks) == len(FAMILIES)
    for number, code in enumerate(blocks, 1):
        result = run_block(code, project, env, timeout=600)
        assert result.returncode == 0, f"example {number} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        assert "built model-store/" in result.stdout

    built = {mar.stem: mar for mar in (project / "model-store").glob("*.mar")}
    assert set(built) == set(FAMILIES)
    body = encode_image(random_image(90, 70, seed=2))
    for name, mar in built.items():
        folder = tmp_path / "unpacked" / name
        with zipfile.ZipFile(mar) as archive:
            archive.extractall(folder)
        sys.path.insert(0, str(folder))  # as TorchServe's worker does: a --model-file is imported from there
        try:
            handler = load_handler(folder)
        finally:
            sys.path.remove(str(folder))
            sys.modules.pop("toy_model", None)
        assert handler.segmenter.config.arch == FAMILIES[name]
        (reply,) = handle(handler, [Request({"body": body}, {"Accept": "image/png"})])
        assert reply.status == 200, reply.body[:300]
        mask = np.asarray(Image.open(io.BytesIO(reply.body)))
        assert mask.shape == (70, 90) and mask.max() < handler.segmenter.config.num_classes
