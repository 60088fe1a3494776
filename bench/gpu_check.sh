#!/usr/bin/env bash
# The GPU check in one run: every `gpu`-marked test, `make bench` in GPU mode (1 and 2 workers), and the
# figures bench/gpu_extras.py takes (fp16/nvJPEG agreement, GPU memory per worker, torch.compile).
#
#   bash bench/gpu_check.sh prepare     here, once: packs Java + TorchServe (.gpu-pack) and the wheels the GPU
#                                       machine lacks (.whl), both git-ignored; ~2 minutes
#   bash bench/gpu_check.sh run         on the GPU machine, from the repository root, with .gpu-pack, .whl and
#                                       model (its weights) carried; writes everything under $OUT (or
#                                       bench/results/gpu-check); at most ~8 minutes on an H200
#   bash bench/gpu_check.sh rehearse    here, on the CPU: the same run, installing from the same pack and
#                                       wheels into /tmp, with small sizes; the GPU-only steps say they skip
#
# The GPU machine has Python 3.12, torch and torchvision, no Java, TorchServe, pycocotools, captum or LitServe
# and no network: TorchServe travels as a jlink'd runtime + frontend (PACK_TORCHSERVE, this workplace's
# pack-torchserve.sh), the rest as py3.12 wheels, together under the 64 MiB a transfer may hold.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
PACK_TORCHSERVE=${PACK_TORCHSERVE:-../shared/gpu/pack-torchserve.sh}
# name==version for pip download; their dependencies that the GPU image lacks are named too (--no-deps).
WHEELS=(pycocotools==2.0.11 captum==0.9.0 litserve==0.2.19 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0
        python-multipart==0.0.34 pyzmq==27.3.0 pydantic==2.14.4 pydantic-core==2.50.5 typing-inspection==0.4.5
        annotated-types==0.8.0 opentelemetry-api==1.45.2)

download_wheels() {  # $1: folder, $2: Python version (the GPU image's is 3.12)
  rm -rf "$1" && mkdir -p "$1"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$2" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$1" "${WHEELS[@]}"
}

prepare() {
  [ -f "$PACK_TORCHSERVE" ] || { echo "gpu_check: set PACK_TORCHSERVE to pack-torchserve.sh (not at $PACK_TORCHSERVE)" >&2; exit 2; }
  OUT_DIR=.gpu-pack bash "$PACK_TORCHSERVE"
  download_wheels .whl 3.12
  du -ch .gpu-pack .whl model | tail -1
}

install() {  # $1: where to unpack, $2: the wheels; sets PATH, JAVA_HOME, PYTHONPATH for TorchServe and them
  local dest=$1 wheels=$2
  eval "$(bash .gpu-pack/unpack.sh "$dest/ts")"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$dest/site" "$wheels"/*.whl
  export PYTHONPATH="$PYTHONPATH:$dest/site:$PWD/src"
}

run() {  # $1: output folder; $2: "gpu" or "rehearsal"
  local out=$1 kind=$2 started=$SECONDS
  mkdir -p "$out"
  export PYTHONUNBUFFERED=1 SEGSERVE_GPU_CHECK=$kind
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
    python3 -c 'import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.cuda.is_available())';
    java -version 2>&1 | head -1; python3 -c "import ts; print('TorchServe from', ts.__file__)"; } | tee "$out/machine.txt"
  local bench_args=(--workloads deeplabv3 --contenders forward,raw,segserve,litserve,stock --batch-size 32
                    --batch-delay 10 --concurrency 1,16,64 --requests 128 --warmup 64)
  local extras_args=()
  if [ "$kind" = rehearsal ]; then
    bench_args=(--workloads deeplabv3 --contenders forward,raw,segserve,litserve,stock --batch-size 2 --batch-delay 5
                --concurrency 1,2 --requests 4 --warmup 2 --images 2 --deeplabv3-size 128)
    extras_args=(--batch 2 --size 128 --images 2 --repeats 1)
  fi
  echo "== 1. gpu-marked tests"
  python3 -m pytest -p no:cacheprovider -m gpu -q tests 2>&1 | tee "$out/gpu-tests.log" | tail -15 || true
  echo "== 2. make bench, GPU mode, 1 worker ($((SECONDS - started)) s so far)"
  python3 bench/run.py "${bench_args[@]}" --workers 1 --out "$out" --name gpu-1worker 2>&1 \
    | tee "$out/bench-1worker.log" | grep -v "it/s\|level/s" | tail -25 || true
  echo "== 3. 2 workers on the GPU ($((SECONDS - started)) s so far)"
  python3 bench/run.py "${bench_args[@]}" --contenders raw,segserve --workers 2 --out "$out" --name gpu-2workers 2>&1 \
    | tee "$out/bench-2workers.log" | grep -v "it/s\|level/s" | tail -12 || true
  echo "== 4. agreement, GPU memory, torch.compile ($((SECONDS - started)) s so far)"
  python3 bench/gpu_extras.py --out "$out/gpu-extras.json" "${extras_args[@]}" 2>&1 | tee "$out/extras.log" | tail -30 || true
  echo "== done in $((SECONDS - started)) s; results in $out"
}

case "$mode" in
  prepare) prepare ;;
  run) install /tmp/segserve-gpu .whl; run "${OUT:-bench/results/gpu-check}" gpu ;;
  rehearse)
    [ -d .gpu-pack ] && [ -d .whl ] || prepare
    # The same wheels for this machine's Python, installed as on the GPU machine, and TorchServe from the pack
    # (both ahead of the venv's on PYTHONPATH), in a throwaway folder.
    PATH="$PWD/.venv/bin:$PATH" download_wheels .gpu-pack/rehearsal-wheels "$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    dest=$(mktemp -d /tmp/segserve-gpu-rehearsal.XXXXXX)
    PATH="$PWD/.venv/bin:$PATH" install "$dest" .gpu-pack/rehearsal-wheels
    PATH="$PWD/.venv/bin:$PATH" run "${OUT:-bench/results/gpu-rehearsal}" rehearsal ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
