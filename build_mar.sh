#!/usr/bin/env bash
# Package handler + segserve + weights + model-config.yaml into model-store/<name>.mar.
# The model is loaded and run once first: a bad checkpoint fails here, not in a worker.
# Usage: ./build_mar.sh [--name segmenter] [--config model/model-config.yaml] [--weights FILE|FOLDER]
#                       [--arch ARCH [--arch-param KEY=VALUE ...]] [--classes a,b,c] [--version V]
#                       [--trust-code] [--export-path model-store]      (--help: every option; --list-archs)
# Nothing is downloaded; a model that is code (--model-file, TorchScript, torch.export) needs --trust-code.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-.venv/bin/python}
if [ ! -x "$PYTHON" ]; then
  echo "build_mar.sh: error: $PYTHON not found; run 'make install' first (or set PYTHON=...)" >&2
  exit 2
fi
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m segserve.tools.build "$@"
