"""docs/own-model.md's worked example, run as written: train, build, `make serve`, predict, `make stop`.

The blocks marked `<!-- guide-step -->` run in order in a copy of the project (sharing this .venv's packages,
never reinstalling them), with TorchServe's ports moved to free ones so a developer's own `make serve` is
left alone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import REPO, run_block

from segserve.tools.server import free_ports

pytestmark = pytest.mark.integration

GUIDE = REPO / "docs" / "own-model.md"
STEP = re.compile(r"<!-- guide-step -->\s*\n```(?P<lang>bash|python)\n(?P<code>.*?)```", re.S)
PROJECT_FILES = ["Makefile", "pyproject.toml", "build_mar.sh", "config.properties", "handler", "src", "model",
                 "docs/sample-input.png"]


def guide_steps() -> list[tuple[str, str]]:
    return [(m["lang"], m["code"]) for m in STEP.finditer(GUIDE.read_text())]


def copy_project(target: Path) -> None:
    for name in PROJECT_FILES:
        source, dest = REPO / name, target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, dest)
    share_venv(target / ".venv")


def share_venv(venv: Path) -> None:
    """A .venv of the copy's own that runs this one's interpreter and packages (bin/, lib/ and pyvenv.cfg linked),
    with the Makefile's install stamp for the copy's pyproject.toml: its `make serve` must not `pip install -e`,
    which would point this venv's segserve at the temporary copy."""
    shared = Path(sys.executable).parent.parent
    venv.mkdir()
    for name in ("bin", "lib", "lib64", "include", "pyvenv.cfg"):
        if (shared / name).exists():
            (venv / name).symlink_to((shared / name).resolve())
    cksum = subprocess.run("cat pyproject.toml | cksum", shell=True, cwd=venv.parent, capture_output=True, text=True,
                           check=True).stdout.split()[0]
    (venv / f".installed-{cksum}").touch()


def editable_installs() -> dict[str, str]:
    """This venv's editable-install .pth files (where its segserve comes from), by name."""
    site = Path(sys.executable).parent.parent / "lib"
    return {path.name: path.read_text() for path in site.glob("python*/site-packages/__editable__*.pth")}


def test_the_guide_has_the_whole_path():
    code = "\n".join(code for _, code in guide_steps())
    for needle in ("torch.save(model.state_dict()", "./build_mar.sh", "make serve", "segserve predict", "make stop"):
        assert needle in code, f"no guide step does {needle!r}"


def test_worked_example_trains_builds_serves_and_predicts(tmp_path):
    project = tmp_path / "project"
    copy_project(project)
    ports = free_ports("inference", "management", "metrics", "grpc_inference", "grpc_management")
    # PYTHONPATH: the copy's segserve for every step (the venv's own install may be another checkout's).
    env = dict(os.environ, **{f"SEGSERVE_{name.upper()}_PORT": str(port) for name, port in ports.items()},
               SEGSERVE_URL=f"http://127.0.0.1:{ports['inference']}", PYTHONPATH=str(project / "src"))
    env.pop("SEGSERVE_MODELS", None)
    env.pop("SEGSERVE_TOKEN", None)
    installed = editable_installs()
    try:
        for number, (lang, code) in enumerate(guide_steps(), 1):
            result = run_block(code, project, env, timeout=600, lang=lang)
            output = f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
            assert result.returncode == 0, f"guide step {number} failed:\n{output}"
            if "segserve predict" in code:
                assert "(384, 512) uint8" in result.stdout, result.stdout
    finally:
        subprocess.run([sys.executable, "-m", "segserve.tools.server", "stop"], cwd=project, env=env,
                       capture_output=True, timeout=120)

    assert editable_installs() == installed, "the guide's make reinstalled segserve into this venv"
    assert (project / "cells.pt").is_file()
    assert (project / "model-store" / "cells.mar").is_file()
    mask = np.asarray(Image.open(project / "masks" / "sample-input.png"))
    assert mask.shape == (384, 512) and mask.max() < 3
