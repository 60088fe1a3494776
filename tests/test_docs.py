"""docs/api.md's examples, run as written against a real server.

A fenced bash or python block preceded by `<!-- test: stdout-contains=TEXT ... -->` is run
with SEGSERVE_URL and SEGSERVE_TOKEN set, in a scratch folder holding docs/sample-input.png;
it must exit 0 and print every TEXT.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from support import REPO, run_block

pytestmark = pytest.mark.integration

DOC = REPO / "docs" / "api.md"
BLOCK = re.compile(r"<!-- test:(?P<spec>.*?)-->\s*\n```(?P<lang>bash|python)\n(?P<code>.*?)```", re.S)


def examples(doc: Path = DOC):
    found = []
    for match in BLOCK.finditer(doc.read_text()):
        expected = [part.strip() for part in re.split(r"\s*stdout-contains=", match["spec"])[1:]]
        line = doc.read_text()[: match.start()].count("\n") + 1
        found.append(pytest.param(match["lang"], match["code"], expected, id=f"{doc.name}:{line}:{match['lang']}"))
    return found


def test_every_format_and_error_has_a_tested_example():
    text = " ".join(" ".join(p.values[2]) for p in examples())
    for needle in ("coco_rle", "MultiPolygon", "image/jpeg", "float16", "empty_body", "invalid_image",
                   "bad_request", "invalid_option", "payload_too_large", "image_too_large",
                   "unsupported_media_type", "InvalidKeyException"):
        assert needle in text, f"no tested example shows {needle}"
    assert len(examples()) >= 20


@pytest.mark.parametrize("lang, code, expected", examples())
def test_example(server, tmp_path, lang, code, expected):
    (tmp_path / "docs").mkdir()
    shutil.copy(REPO / "docs" / "sample-input.png", tmp_path / "docs")
    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ, SEGSERVE_URL=server.inference_url, SEGSERVE_TOKEN=server.keys()["inference"],
               PATH=f"{venv_bin}:{os.environ.get('PATH', '')}")
    result = run_block(code, tmp_path, env, timeout=180, lang=lang)
    assert result.returncode == 0, result.stderr[-2000:]
    for text in expected:
        assert text in result.stdout, f"expected {text!r} in:\n{result.stdout[-1500:]}"
