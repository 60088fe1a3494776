"""A short `make soak` (bench/soak.py) against the session's TorchServe: mixed good and bad load from 16
clients, one worker killed with -9 and a scale-down, all under load. The full run is `make soak`."""

from __future__ import annotations

import sys

import pytest
import requests
from support import MODEL, REPO

sys.path.insert(0, str(REPO))
from bench.soak import run_soak, table  # noqa: E402

pytestmark = pytest.mark.integration


def test_short_soak_with_a_kill_and_a_scale_down(server):
    try:
        # Scales 1 -> 2 workers under load, 10 s steady, kill -9 one, then scales to 1 under load.
        report = run_soak(server, duration=20, clients=16, workers=2, scale_steps=[1])
    finally:
        requests.put(f"{server.management_url}/models/{MODEL}", params={"min_worker": 1, "synchronous": "true"},
                     headers=server.headers("management"), timeout=300)
    print(table(report))
    # Worker RSS growth is `make soak`'s to judge: 10 s of steady load right after a worker started cannot
    # tell growth from warm-up. Every other criterion holds here too.
    failed = [name for name, ok in report["criteria"].items() if not ok and not name.startswith("worker RSS")]
    assert not failed, f"failed: {failed}\n{table(report)}"
    assert report["restarts"] == 1 and report["phases"]["kill"]["good"] > 0 and report["phases"]["scale"]["good"] > 0
    assert report["bad"] > 0 and all(not s.startswith("5") for s in report["phases"]["steady"]["bad_status"])
