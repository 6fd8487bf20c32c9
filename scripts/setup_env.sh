#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install what is missing.
#
# torch is installed first and pinned to a CPU build that is already installed or
# available as a local wheel (pip's find-links), so that resolving the project's
# dependencies never pulls gigabytes of CUDA packages.
#
# Usage: scripts/setup_env.sh [EXTRAS]      (default extras: dev,server,torchrl)
# Env:   VENV (default: .venv in the repo), PYTHON (default: python3),
#        TORCH_SPEC (default: the installed torch, else torch==2.13.0)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev,server,torchrl}"
venv="${VENV:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating virtual environment in $venv"
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip install --disable-pip-version-check -q)

# 1. torch: keep what the venv has; else the version the system Python has; else 2.13.0
#    (this machine has a local CPU wheel of it, which pip's find-links picks up).
if "$py" -c "import torch" 2>/dev/null; then
  torch_spec="torch==$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')"
else
  sys_torch="$("$python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
  torch_spec="${TORCH_SPEC:-torch==${sys_torch:-2.13.0}}"
  echo "==> installing $torch_spec (CPU build from a local wheel when one is there)"
  "${pip[@]}" "$torch_spec" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
fi

# 2. The package and its extras, with torch held where it is.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$torch_spec" > "$constraints"
echo "==> installing redis_weights[$extras] (torch pinned: $torch_spec)"
"${pip[@]}" -c "$constraints" -e ".[$extras]" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
"$py" -c "import torch, redis_weights; print('torch', torch.__version__, '| redis_weights', redis_weights.__version__)"
