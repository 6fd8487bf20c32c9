#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install what is missing.
#
# torch is installed first and pinned to a CPU build that is already installed or
# available as a local wheel (pip's find-links), so that resolving the project's
# dependencies never pulls gigabytes of CUDA packages.
#
# Usage: scripts/setup_env.sh [EXTRAS]      (default extras: dev,server,torchrl,docs)
# Env:   VENV (default: .venv in the repo), PYTHON (default: python3),
#        TORCH_SPEC (default: the installed torch, else torch==2.13.0+cpu),
#        TORCH_INDEX_URL (where a +cpu build comes from when no local wheel has it)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev,server,torchrl,docs}"
venv="${VENV:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating virtual environment in $venv"
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip install --disable-pip-version-check -q)

# 1. torch: keep the build the venv has; else the system Python's build; else 2.13.0+cpu.
#    The spec keeps the local label ("+cpu"), so pip can only take a CPU build: from a
#    local wheel (pip's find-links) first, else from PyTorch's CPU index. Plain PyPI
#    torch wheels for Linux are the CUDA build with gigabytes of dependencies.
torch_version() { "$1" -c 'import torch; print(torch.__version__)' 2>/dev/null || true; }
quiet() { { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
venv_torch="$(torch_version "$py")"
if [ -n "$venv_torch" ]; then
  torch_spec="torch==$venv_torch"
else
  sys_torch="$(torch_version "$python")"
  torch_spec="${TORCH_SPEC:-torch==${sys_torch:-2.13.0+cpu}}"
  echo "==> installing $torch_spec (a local wheel when one is there)"
  if ! "${pip[@]}" "$torch_spec" 2>&1 | quiet; then
    case "$torch_spec" in
      *+cpu*)
        echo "==> no local wheel for $torch_spec: trying PyTorch's CPU index"
        "${pip[@]}" --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" "$torch_spec" 2>&1 | quiet ;;
      *) echo "error: could not install $torch_spec" >&2; exit 1 ;;
    esac
  fi
fi

# 2. The package and its extras, with torch held where it is.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$torch_spec" > "$constraints"
echo "==> installing redis_weights[$extras] (torch pinned: $torch_spec)"
"${pip[@]}" -c "$constraints" -e ".[$extras]" 2>&1 | quiet
"$py" -c "import torch, redis_weights; print('torch', torch.__version__, '| redis_weights', redis_weights.__version__)"
sha256sum pyproject.toml > "$venv/.redis_weights-pyproject.sha256"  # scripts/test.sh re-runs this when it changes
