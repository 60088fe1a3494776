"""The README's commands, run as written against a real server.

Every fenced bash or python block of README.md is preceded by one of
    <!-- test: stdout-contains=TEXT ... creates=FILE ... -->   run here: exits 0, prints every TEXT, writes FILE
    <!-- not tested: REASON -->                                 skipped, with that reason
so no command block goes unchecked without saying why. A tested block runs in a scratch folder laid out like
the repository after `make serve`: docs/ with the sample input and figures, run/key_file.json (the test
server's keys), .venv (this venv); KEY and SEGSERVE_URL/SEGSERVE_TOKEN are set, and the README's default
addresses (http://127.0.0.1:8080 and :8081) are replaced by the test server's.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import requests
from support import MODEL, REPO, run_block

README = REPO / "README.md"
BLOCK = re.compile(r"(?:<!-- (?P<marker>test|not tested):?(?P<spec>.*?)-->\s*\n)?```(?P<lang>bash|python)\n"
                   r"(?P<code>.*?)```", re.S)


def blocks() -> list:
    text = README.read_text()
    found = []
    for match in BLOCK.finditer(text):
        line = text[: match.start("lang")].count("\n") + 1
        ident = f"README.md:{line}:{match['lang']}"
        if match["marker"] == "not tested":
            found.append(pytest.param(match["lang"], match["code"], None, id=ident,
                                      marks=pytest.mark.skip(reason=f"README says: {match['spec'].strip()}")))
        else:
            found.append(pytest.param(match["lang"], match["code"], match["spec"] if match["marker"] else None,
                                      id=ident))
    return found


def expectations(spec: str) -> tuple[list[str], list[str]]:
    parts = re.split(r"\s*\b(stdout-contains|creates)=", " " + spec)[1:]
    pairs = list(zip(parts[::2], (p.strip() for p in parts[1::2]), strict=True))
    return [v for k, v in pairs if k == "stdout-contains"], [v for k, v in pairs if k == "creates"]


def test_every_command_block_is_tested_or_says_why_not():
    text = README.read_text()
    for match in BLOCK.finditer(text):
        line = text[: match.start("lang")].count("\n") + 1
        assert match["marker"], f"README.md:{line}: a {match['lang']} block without <!-- test: --> or <!-- not tested:"
        if match["marker"] == "not tested":
            assert match["spec"].strip(), f"README.md:{line}: say why it is not tested"
    tested = [b for b in blocks() if not b.marks]
    assert len(tested) >= 4


@pytest.fixture()
def scratch(tmp_path, server):
    """A folder laid out like the repository after `make serve`, pointing at the test server."""
    shutil.copytree(REPO / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("bench"))
    (tmp_path / "run").mkdir()
    shutil.copy(server.workdir / "key_file.json", tmp_path / "run" / "key_file.json")
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    yield tmp_path
    # The scaling example asks for 2 workers: give the shared server back its one.
    requests.put(f"{server.management_url}/models/{MODEL}", params={"min_worker": 1, "synchronous": "true"},
                 headers=server.headers("management"), timeout=240)


@pytest.mark.integration
@pytest.mark.parametrize("lang, code, spec", [b for b in blocks()])
def test_block(server, scratch, lang, code, spec):
    for default, actual in (("http://127.0.0.1:8080", server.inference_url),
                            ("http://127.0.0.1:8081", server.management_url)):
        code = code.replace(default, actual)
    keys = server.keys()
    env = dict(os.environ, KEY=keys["inference"], SEGSERVE_URL=server.inference_url,
               SEGSERVE_TOKEN=keys["inference"], SEGSERVE_MANAGEMENT_URL=server.management_url,
               PYTHONPATH=str(REPO / "src"), PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    result = run_block(code, scratch, env, timeout=300, lang=lang)
    assert result.returncode == 0, result.stderr[-2000:]
    printed, created = expectations(spec or "")
    for text in printed:
        assert text in result.stdout, f"expected {text!r} in:\n{result.stdout[-1500:]}"
    for name in created:
        assert (scratch / name).is_file() and (scratch / name).stat().st_size > 0, f"{name} was not written"
