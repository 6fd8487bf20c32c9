#!/usr/bin/env bash
# The project's test command: set up the environment if needed, then run the suite.
# Usage: scripts/test.sh [pytest args...]
# Env:   REDIS_WEIGHTS_REQUIRE_SERVER=1 makes a missing redis/valkey server a failure
#        instead of a skip (CI sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
# Set up when the venv is missing, broken, or older than pyproject.toml (a new dependency).
stamp="$venv/.redis_weights-pyproject.sha256"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import redis_weights, fakeredis, torch, matplotlib" 2>/dev/null \
   || ! sha256sum --status -c "$stamp" 2>/dev/null; then
  scripts/setup_env.sh
fi
exec "$venv/bin/python" -m pytest -q "$@"
