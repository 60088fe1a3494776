"""The worker boundary: the model archive ships exactly the worker (segserve/*.py, the handler, the weights,
model-config.yaml, the manifest), and the worker's modules import from the unpacked archive, as a TorchServe
worker imports them, with the client's and the tools' packages and dependencies out of reach."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from support import MODEL, REPO

from segserve.config import ServingConfig

PACKAGE = REPO / "src" / "segserve"
# The package's top level and its worker subpackages (segserve.medical), as paths below segserve/ without .py.
WORKER_MODULES = sorted(path.relative_to(PACKAGE).with_suffix("").as_posix() for path in PACKAGE.rglob("*.py")
                        if path.relative_to(PACKAGE).parts[0] not in ("tools", "client"))
HANDLER = "segmenter_handler"
# Besides the modules: the handler's config and the manifest, and the weights that config names.
DATA = {"model-config.yaml", "MAR-INF/MANIFEST.json"}
# What a worker never needs: the client's HTTP and progress-bar dependencies and the non-worker subpackages.
BLOCKED = ("requests", "tqdm", "segserve.tools", "segserve.client")

# Run with `python -I -c`: imports each module named from ROOT (the unpacked archive) with BLOCKED refused.
IMPORT_ALL = """
import importlib, importlib.machinery, sys
ROOT, BLOCKED, MODULES = sys.argv[1], tuple(sys.argv[2].split(",")), sys.argv[3].split(",")

# Finds the blocked modules and fails importing them: a probe by importlib.util.find_spec (torch._dynamo
# probes for tqdm) is no import and gets a spec.
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ImportError(f"a worker module imported {spec.name}")

    def exec_module(self, module):
        pass

sys.meta_path.insert(0, Refuse())
sys.path.insert(0, ROOT)  # TorchServe puts the unpacked archive first on the worker's path
for name in MODULES:
    module = importlib.import_module(name)
    assert module.__file__.startswith(ROOT), f"{name} came from {module.__file__}, not the archive"
print("imported", len(MODULES))
"""


def test_worker_modules_are_the_top_level_of_the_package():
    assert {"__init__", "config", "pipeline"} <= set(WORKER_MODULES)
    assert not {"build", "server", "deploy", "api", "cli"} & set(WORKER_MODULES)  # tools/ and client/ stay out


@pytest.fixture(scope="module")
def unpacked(model_store, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unpacked") / MODEL
    with zipfile.ZipFile(model_store / f"{MODEL}.mar") as archive:
        archive.extractall(root)
    return root


def test_archive_holds_exactly_the_worker(model_store):
    with zipfile.ZipFile(model_store / f"{MODEL}.mar") as archive:
        names = {name for name in archive.namelist() if not name.endswith("/")}
        weights = ServingConfig.from_dict(yaml.safe_load(archive.read("model-config.yaml"))["handler"]).weights
    modules = {name for name in names if name.endswith(".py")}
    expected = {f"{HANDLER}.py"} | {f"segserve/{name}.py" for name in WORKER_MODULES}
    assert sorted(modules - expected) == [], "shipped but no worker module (tools/ or client/?)"
    assert sorted(expected - modules) == [], "a worker module is missing from the archive"
    assert names - modules == DATA | {weights}


def import_all(root: Path, modules: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", "-c", IMPORT_ALL, str(root), ",".join(BLOCKED), ",".join(modules)],
                          cwd=root, capture_output=True, text=True, timeout=300)


def test_every_worker_module_imports_from_the_archive_without_client_or_tools(unpacked):
    modules = [f"segserve.{name}".removesuffix(".__init__").replace("/", ".") for name in WORKER_MODULES] + [HANDLER]
    result = import_all(unpacked, modules)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"imported {len(modules)}" in result.stdout


def test_the_import_check_catches_a_worker_module_reaching_for_the_client(unpacked, tmp_path):
    root = tmp_path / MODEL
    shutil.copytree(unpacked, root)
    for name, line in (("leak_client", "from segserve.client import SegservClient"), ("leak_tqdm", "import tqdm"),
                       ("leak_tools", "from segserve.tools import server")):
        (root / "segserve" / f"{name}.py").write_text(line + "\n")
        result = import_all(root, ["segserve.config", f"segserve.{name}"])
        assert result.returncode != 0 and "a worker module imported" in result.stderr, name
