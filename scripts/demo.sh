#!/usr/bin/env bash
# One command that shows the whole system working: set up the environment if needed, then
# `redis-weights demo` (a trainer and worker processes on a private Redis/Valkey server).
# Usage: scripts/demo.sh [demo options...]   e.g. scripts/demo.sh --workers 8 --size-mb 64
#        REDIS_URL=redis://host:6379/0 scripts/demo.sh    (use your server, in a throw-away namespace)
# Defaults: 4 workers, a 16 MB model, 10 versions.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
stamp="$venv/.redis_weights-pyproject.sha256"  # written by setup_env.sh: re-run it when pyproject.toml changes
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import redis_weights, rich, torch" 2>/dev/null \
   || ! sha256sum --status -c "$stamp" 2>/dev/null; then
  scripts/setup_env.sh
fi
exec "$venv/bin/python" -m redis_weights demo "$@"
