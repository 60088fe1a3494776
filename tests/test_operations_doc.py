"""docs/operations.md's commands, run as written, in order, against a server started the way it says
(conftest's ops_server: two versions of the default model, the model API on).

Each block marked `<!-- test: stdout-contains=TEXT ... -->` (the syntax of tests/test_docs.py) runs with
bash in the server's folder, where `run/key_file.json` and `run/logs/` are as `make serve` leaves them,
with SEGSERVE_URL, SEGSERVE_MANAGEMENT_URL and SEGSERVE_METRICS_URL set; it must exit 0 and print every TEXT.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from support import REPO, run_block
from test_docs import examples

pytestmark = pytest.mark.integration

DOC = REPO / "docs" / "operations.md"


def test_every_management_command_has_a_tested_example():
    code = "\n".join(p.values[1] for p in examples(DOC))
    for needle in ("/token?type=inference", "customized=true", "min_worker=2", "set-default", "-X DELETE",
                   "-X POST", "/metrics", "segserve health", "x-request-id"):
        assert needle in code, f"no tested block does {needle!r}"


@pytest.mark.parametrize("lang, code, expected", examples(DOC))
def test_block(ops_server, lang, code, expected):
    root = ops_server.workdir.parent  # holds run/ (keys, logs) as make serve's project folder does
    (root / "docs").mkdir(exist_ok=True)
    shutil.copy(REPO / "docs" / "sample-input.png", root / "docs")
    env = dict(os.environ, SEGSERVE_URL=ops_server.inference_url, SEGSERVE_MANAGEMENT_URL=ops_server.management_url,
               SEGSERVE_METRICS_URL=ops_server.metrics_url,
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    for name in ("SEGSERVE_TOKEN", "SEGSERVE_MANAGEMENT_TOKEN", "SEGSERVE_KEY_FILE"):
        env.pop(name, None)
    result = run_block(code, root, env, timeout=300)
    assert result.returncode == 0, f"{result.stdout[-1500:]}\n{result.stderr[-2000:]}"
    for text in expected:
        assert text in result.stdout, f"expected {text!r} in:\n{result.stdout[-1500:]}"
