"""scripts/architecture.py: the worker boundary it enforces, the request flow it traces, the pictures it writes."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from support import MODEL, REPO

sys.path.insert(0, str(REPO))
from scripts import architecture  # noqa: E402

SCRIPT = REPO / "scripts" / "architecture.py"

# A small tree with the repository's layout that keeps the boundary: the client may use a tools module
# that needs no worker.
CLEAN = {
    "handler/segmenter_handler.py": "from ts.torch_handler.base_handler import BaseHandler\n\n"
                                    "from segserve.pipeline import run\n",
    "src/segserve/__init__.py": "",
    "src/segserve/config.py": "import yaml\n",
    "src/segserve/pipeline.py": "import torch\n\nfrom .config import load\n",
    "src/segserve/tools/__init__.py": "",
    "src/segserve/tools/build.py": "from ..pipeline import run\n",
    "src/segserve/tools/server.py": "import requests\n",
    "src/segserve/client/__init__.py": "from .api import Client\n",
    "src/segserve/client/api.py": "import requests\n\nfrom segserve.tools import server\n",
}

PLANTED = {
    "worker imports tools, relative, in a function": (
        "src/segserve/pipeline.py", "\ndef build():\n    from .tools import build\n",
        "worker module segserve.pipeline imports segserve.tools.build"),
    "handler imports the client": (
        "handler/segmenter_handler.py", "import segserve.client.api\n",
        "worker module segmenter_handler imports segserve.client.api"),
    "client imports a worker module": (
        "src/segserve/client/api.py", "from ..config import load\n",
        "client module imports worker module segserve.config"),
    "client imports a worker module by package": (
        "src/segserve/client/api.py", "from segserve import pipeline\n",
        "client module imports worker module segserve.pipeline"),
    "client imports torch in a function": (
        "src/segserve/client/api.py", "\ndef f():\n    import torch.nn\n",
        "client module imports torch"),
    "client reaches the worker through a tools module": (
        "src/segserve/tools/server.py", "from ..config import load\n",
        "segserve.client.api -> segserve.tools.server -> segserve.config"),
    "client reaches the worker through a package's __init__": (
        "src/segserve/tools/__init__.py", "from ..pipeline import run\n",
        "segserve.client.api -> segserve.tools -> segserve.pipeline"),
    "the root package, which every client import runs, imports a worker module": (
        "src/segserve/__init__.py", "from .config import load\n",
        "segserve/__init__.py (run by every client import) imports worker module segserve.config"),
}


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--check", "--root", str(root)], capture_output=True,
                          text=True, timeout=120)


def test_a_tree_that_keeps_the_boundary_passes(tmp_path):
    result = check(write_tree(tmp_path, CLEAN))
    assert result.returncode == 0, result.stderr
    assert "boundary holds" in result.stdout


@pytest.mark.parametrize("case", PLANTED)
def test_a_planted_import_across_the_boundary_fails_the_check(tmp_path, case):
    name, added, expected = PLANTED[case]
    root = write_tree(tmp_path, CLEAN)
    (root / name).write_text((root / name).read_text() + added)
    result = check(root)
    assert result.returncode == 1
    assert expected in result.stderr, result.stderr
    assert result.stderr.count("boundary:") == 1, result.stderr


def test_a_worker_module_importing_tools_in_a_copy_of_this_tree_is_caught(tmp_path):
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("handler", "src"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=ignore)
    errors = tmp_path / "src" / "segserve" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _planted():\n    from segserve.tools.server import free_ports\n")
    before = {v.message for v in architecture.check_boundary(architecture.discover(REPO))}
    after = {v.message for v in architecture.check_boundary(architecture.discover(tmp_path))}
    planted = after - before
    assert len(planted) == 1 and "worker module segserve.errors imports segserve.tools.server" in planted.pop()
    assert check(tmp_path).returncode == 1


def test_imports_are_read_relative_absolute_and_inside_functions():
    modules = architecture.discover(REPO)
    handler = {i.target for i in modules["segmenter_handler"].internal(modules)}
    assert "segserve.pipeline" in handler  # from segserve.pipeline import ...
    assert "segserve.config" in {i.target for i in modules["segserve.pipeline"].internal(modules)}  # from .config
    lazy = [i for m in modules.values() for i in m.imports if i.lazy]
    assert lazy, "no import inside a function found (segserve imports optional packages lazily)"
    assert {m.zone for m in modules.values()} == {"worker", "tools", "client"}


def test_each_box_is_named_by_its_path_in_its_zone():
    modules = architecture.discover(REPO)
    labels = {(m.zone, m.label) for m in modules.values()}
    assert len(labels) == len(modules)  # no two boxes of a zone read alike (there are three __init__.py)
    assert {("worker", "medical/seg.py"), ("worker", "medical/__init__.py"), ("worker", "pipeline.py"),
            ("worker", "segmenter_handler.py"), ("client", "ui/__init__.py"), ("tools", "build.py")} <= labels


def test_this_repository_keeps_the_boundary():
    result = check(REPO)
    assert result.returncode == 0, result.stderr


def _fails():
    raise KeyError("planted")


def _handles():
    try:
        _fails()
    except KeyError:
        pass


def _leaf() -> int:
    return 1


@contextlib.contextmanager
def _guard():
    try:
        yield
    except KeyError:
        _leaf()


def _batch() -> list[int]:
    _handles()
    with _guard():
        _fails()
    return [_leaf() for _ in range(3)]


def test_the_tracer_keeps_nesting_call_order_and_how_each_call_ended():
    here = str(Path(__file__).resolve())
    with architecture.Tracer(lambda filename: "test" if str(Path(filename).resolve()) == here else None) as tracer:
        _batch()
    assert [(c.name, c.depth, c.raised) for c in tracer.calls] == [
        ("_batch", 0, None),
        ("_handles", 1, None),
        ("_fails", 2, "KeyError"),  # raised, then handled by its caller
        ("_guard", 1, None),  # a context manager: one call, its exit work under it, after the block
        ("_fails", 1, "KeyError"),
        ("_leaf", 2, None),
        ("_leaf", 1, None), ("_leaf", 1, None), ("_leaf", 1, None),  # the list comprehension is see-through
    ]
    assert tracer.calls[5].parent == 3


def test_collapse_merges_repeats_and_folds_calls_that_stay_in_their_file():
    def call(module, name, depth, parent=None):
        return architecture.Call(module, name, depth, parent)

    calls = [call("a.py", "stage", 0), call("b.py", "each", 1, 0), call("b.py", "each", 1, 0),
             call("b.py", "each", 1, 0), call("a.py", "helper", 1, 0), call("a.py", "inner", 2, 4),
             call("a.py", "outer", 1, 0), call("c.py", "far", 2, 6)]
    for i, c in enumerate(calls):
        if c.parent is not None:
            calls[c.parent].children.append(i)
    rows = architecture.collapse(calls)
    assert [(r.name, r.count, r.parent) for r in rows] == [
        ("stage", 1, None), ("each", 3, 0), ("helper", 1, 0), ("outer", 1, 0), ("far", 1, 3)]


@pytest.fixture(scope="module")
def model_dir(model_store, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("unzipped")
    with zipfile.ZipFile(model_store / f"{MODEL}.mar") as archive:
        archive.extractall(target)
    return target


@pytest.fixture(scope="module")
def flow(model_dir):
    return architecture.trace_flow(model_dir)


def test_the_traced_batch_goes_through_the_three_handler_stages_in_order(flow):
    assert flow.stages == ["preprocess", "inference", "postprocess"]
    assert [r.split()[0] for r in flow.responses][:2] == ["200", "200"]
    assert flow.responses[2].startswith("4"), flow.responses  # the body that is no image
    # Only functions of the handler and of the worker modules, nothing of torch, TorchServe or tools.
    ours = {p.name for p in (REPO / "src" / "segserve").glob("*.py")} | {"segmenter_handler.py"}
    assert {call.module for call in flow.calls} <= ours
    stage = None
    raised_in = set()
    for call in flow.calls:
        stage = call.name.rsplit(".", 1)[-1] if call.depth == 0 else stage
        if call.raised:
            raised_in.add(stage)
    assert "preprocess" in raised_in  # the bad request fails while decoding, and only that request
    assert max(call.depth for call in flow.calls) <= architecture.MAX_DEPTH


def test_the_generator_writes_both_pictures_and_leaves_docs_alone(tmp_path, model_dir):
    docs = sorted((p.name, p.stat().st_mtime_ns) for p in (REPO / "docs").glob("*"))
    code = architecture.main(["--out", str(tmp_path), "--model-dir", str(model_dir)])
    violations = architecture.check_boundary(architecture.discover(REPO))
    assert code == (1 if violations else 0)
    for name in ("architecture-modules.png", "architecture-flow.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(data) < 300_000, f"{name} is {len(data)} bytes"
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (REPO / "docs").glob("*")) == docs
