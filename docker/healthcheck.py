#!/usr/bin/env python3
"""Container health check: exit 0 when TorchServe's /ping answers Healthy.

With token auth on, TorchServe 0.12 wants the inference key even on /ping; it is in
key_file.json in TorchServe's working directory, which this script reads (it runs in
the same container). Standard library only.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


def main() -> int:
    port = os.environ.get("SEGSERVE_INFERENCE_PORT", "8080")
    workdir = Path(os.environ.get("SEGSERVE_WORKDIR") or os.getcwd())
    request = urllib.request.Request(f"http://127.0.0.1:{port}/ping")
    key_file = workdir / "key_file.json"
    if key_file.is_file():
        try:
            key = json.loads(key_file.read_text())["inference"]["key"]
            request.add_header("Authorization", f"Bearer {key}")
        except (ValueError, KeyError) as exc:
            print(f"unhealthy: unreadable {key_file}: {exc}")
            return 1
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            status = json.loads(response.read()).get("status")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unhealthy: {exc}")
        return 1
    print(status)
    return 0 if status == "Healthy" else 1


if __name__ == "__main__":
    sys.exit(main())
