"""Fuzzing a real TorchServe: mutated, truncated, oversized and malformed requests (bench/hostile.py).

Every answer must be a 200 or a 4xx with a JSON error body, within a bounded time, and no worker may
crash or be restarted. Cases are deterministic: a failure names its seed and index, and
`SEGSERVE_FUZZ_SEED=<seed>` replays the run (`fuzz_case(seed, index)` rebuilds one case alone).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from support import MODEL, REPO

sys.path.insert(0, str(REPO))
from bench.hostile import Case, fuzz_case  # noqa: E402

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("SEGSERVE_FUZZ_SEED", "0"))
CASES = int(os.environ.get("SEGSERVE_FUZZ_CASES", "600"))
CLIENTS = 8


def worker_pids(server) -> dict[str, int]:
    response = requests.get(f"{server.management_url}/models/{MODEL}", headers=server.headers("management"),
                            timeout=30)
    workers = response.json()[0]["workers"]
    assert all(w["status"] == "READY" for w in workers), workers
    return {w["id"]: w["pid"] for w in workers}


def expectation(case: Case) -> str:
    return case.expect if isinstance(case.expect, str) else " or ".join(map(str, sorted(case.expect)))


def answer(server, case: Case) -> tuple[int | str, str | None]:
    """(status, what is wrong with the server's answer to `case` or None if it is acceptable)."""
    try:
        response = requests.post(f"{server.inference_url}/predictions/{MODEL}", data=case.body,
                                 headers={**server.headers(), **case.headers}, timeout=60)
    except requests.RequestException as exc:
        return type(exc).__name__, f"no answer ({type(exc).__name__})"
    return response.status_code, problem(case, response)


def problem(case: Case, response: requests.Response) -> str | None:
    """What is wrong with this answer to `case`, or None."""
    if response.status_code == 200:
        return None if case.allows(200) else f"status 200 (expected {expectation(case)})"
    try:
        error = response.json()
    except ValueError:
        return f"status {response.status_code} without a JSON body: {response.text[:300]!r}"
    if not case.allows(response.status_code, error.get("type") if isinstance(error, dict) else None):
        return f"status {response.status_code} (expected {expectation(case)}): {response.text[:300]!r}"
    if not (isinstance(error, dict) and error.get("code") == response.status_code
            and isinstance(error.get("type"), str) and isinstance(error.get("message"), str) and error["message"]):
        return f"status {response.status_code} with an error body that is not {{code, type, message}}: {error!r}"
    return None


def test_hostile_inputs_get_json_4xx_and_never_crash_a_worker(server):
    cases = [fuzz_case(SEED, index) for index in range(CASES)]
    assert sum(case.expect == frozenset({200}) for case in cases) > 0  # good requests ride along
    before = worker_pids(server)
    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(lambda c: answer(server, c), cases))
    after = worker_pids(server)
    print(f"fuzz seed {SEED}: {len(cases)} cases, answers by status:",
          dict(sorted(Counter(str(status) for status, _ in answers).items())))
    problems = [(case.name, p) for case, (_, p) in zip(cases, answers, strict=True) if p]
    report = "\n".join(f"{name}: {p}" for name, p in problems[:30])
    assert not problems, (f"{len(problems)} of {len(cases)} cases failed (replay: SEGSERVE_FUZZ_SEED={SEED}; "
                          f"one case: bench.hostile.fuzz_case(seed, index)):\n{report}")
    assert after == before, f"workers changed during the fuzz (crash or restart): {before} -> {after}"
