"""The client and CLI without torch or TorchServe: the base distribution (pyproject `dependencies`, no extras)
installed into a fresh venv runs `segserve` and imports `segserve.client`, against the real server too;
and segserve/client/ imports nothing of the worker package."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from support import REPO

from segserve.tools.synthetic import generate_scene

CLIENT = REPO / "src" / "segserve" / "client"
# The base install's dependencies, by import name (requests, numpy, pillow, tqdm).
CLIENT_DEPENDENCIES = {"requests", "numpy", "PIL", "tqdm"}
SERVER_ONLY = {"torch", "torchvision", "torchserve", "torch-model-archiver", "pyyaml", "safetensors", "pycocotools",
               "opencv-python-headless", "shapely"}


def test_the_client_imports_only_itself_the_standard_library_and_its_dependencies():
    for path in sorted(CLIENT.rglob("*.py")):
        depth = len(path.relative_to(CLIENT).parts)  # 1 in client/, 2 in client/ui/: `..` still inside client
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level <= depth, f"{path}: from {'.' * node.level}{node.module or ''}: the worker package"
                continue
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                top = name.split(".")[0]
                if top == "segserve":
                    assert name == "segserve.client" or name.startswith("segserve.client."), f"{path.name}: {name}"
                else:
                    assert top in sys.stdlib_module_names or top in CLIENT_DEPENDENCIES, f"{path.name}: {name}"


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A fresh venv with `pip install <repository>`: the base distribution only."""
    root = tmp_path_factory.mktemp("client-install")
    source = root / "source"  # a copy, so the build leaves no build/ or *.egg-info in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-3000:]
    return venv


def test_the_base_install_has_no_torch_or_torchserve(client_venv):
    listed = subprocess.run([str(client_venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
                            capture_output=True, text=True, check=True, timeout=120)
    installed = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert {"segserve", "requests", "numpy", "pillow", "tqdm"} <= installed
    assert installed & SERVER_ONLY == set()


def test_segserve_help_and_the_client_import_run_there(client_venv):
    help_text = subprocess.run([str(client_venv / "bin" / "segserve"), "--help"], capture_output=True, text=True,
                               timeout=120)
    assert help_text.returncode == 0 and all(c in help_text.stdout for c in ("predict", "models", "health", "ui"))
    version = subprocess.run([str(client_venv / "bin" / "segserve"), "--version"], capture_output=True, text=True,
                             timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == "segserve " + _project_version()
    code = ("import sys; from segserve.client import SegservClient; import segserve.client.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('segserve', 'torch', 'ts', 'yaml')))")
    imported = subprocess.run([str(client_venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                              timeout=120)
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert imported.stdout.split() == ["['segserve',", "'segserve.client',", "'segserve.client.aio',",
                                       "'segserve.client.api',", "'segserve.client.cli',", "'segserve.client.errors',",
                                       "'segserve.client.exports']"]


def test_the_page_is_installed_with_the_client(client_venv):
    code = ("from importlib.resources import files; page = files('segserve.client.ui'); "
            "print(sorted(p.name for p in page.iterdir() if p.suffix in ('.html', '.js', '.css')))")
    listed = subprocess.run([str(client_venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert listed.stdout.split() == ["['app.js',", "'index.html',", "'style.css']"]


def _project_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


@pytest.mark.integration
def test_the_cli_from_the_client_venv_segments_an_image(client_venv, server, tmp_path):
    image = tmp_path / "scene.png"
    Image.fromarray(generate_scene(71, (90, 130))[0]).save(image)
    result = subprocess.run([str(client_venv / "bin" / "segserve"), "predict", str(image), "--format", "png",
                             "--url", server.inference_url, "--key-file", str(server.workdir / "key_file.json"),
                             "--out", str(tmp_path / "masks"), "--no-progress"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 of 1 segmented" in result.stdout
    assert Image.open(tmp_path / "masks" / "scene.png").size == (130, 90)
