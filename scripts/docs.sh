#!/usr/bin/env bash
# Build the manual (docs/, mkdocs.yml) into site/, strictly: any warning (a broken link or
# anchor, a page missing from the nav, a docstring mkdocstrings cannot parse) fails the build.
#
# Usage: scripts/docs.sh [mkdocs build options]     (e.g. -d /tmp/site)
# Env:   VENV (default: .venv in the repo); installs the `docs` extra there when mkdocs is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
if ! "$venv/bin/python" -c "import mkdocs, mkdocstrings_handlers.python" 2>/dev/null; then
  VENV="$venv" bash scripts/setup_env.sh   # its default extras include docs
fi
"$venv/bin/python" -m mkdocs build --strict --site-dir site "$@"
