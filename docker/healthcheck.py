#!/usr/bin/env python3
"""Container health check (the image's HEALTHCHECK): exit 0 when /ping answers 200 and every model has a
READY worker, renewing an expired TorchServe key with the non-expiring API key of key_file.json.

segserve.tools.probe with the container's settings (SEGSERVE_INFERENCE_PORT, SEGSERVE_MANAGEMENT_PORT,
SEGSERVE_WORKDIR); arguments are passed on (e.g. --ping-only). Also runs from a checkout, on its src/.
"""

from __future__ import annotations

import sys
from pathlib import Path

CHECKOUT_SRC = Path(__file__).resolve().parents[1] / "src"
if (CHECKOUT_SRC / "segserve").is_dir():
    sys.path.insert(0, str(CHECKOUT_SRC))

from segserve.tools.probe import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
