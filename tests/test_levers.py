"""bench/levers.py runs a TorchServe per variant; the gRPC client answers what HTTP answers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import REPO

pytestmark = pytest.mark.integration


def test_levers_measure_each_variant_and_grpc_answers_the_http_masks(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "levers.py"), "--variants", "baseline,grpc,quiet-logs+netty-1",
               "--requests", "2", "--warmup", "1", "--concurrency", "1", "--images", "2", "--out", str(tmp_path),
               "--name", "smoke"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "smoke.json").read_text())
    rows = {row["variant"]: row for row in report["rows"]}
    assert set(rows) == {"baseline", "grpc", "quiet-logs+netty-1"}
    assert all(row["errors"] == 0 and row["images_per_s"] > 0 and row["vs_raw"] > 0 for row in rows.values())
    assert rows["grpc"]["samples"] == {"grpc_answers_equal_http": "2/2"}
    combined = report["variants"]["quiet-logs+netty-1"]
    assert combined["quiet_logs"] and combined["properties"] == {"number_of_netty_threads": "1",
                                                                 "netty_client_threads": "1"}
    assert "vs base" in result.stdout
