#!/usr/bin/env bash
# Sets everything up, then runs the main job: the kvtier REST service on the embedded default store
# (a 2 GiB host-memory tier over a 20 GiB local-disk tier in ~/.cache/kvtier/disk; no Redis needed),
# on http://127.0.0.1:8470 (OpenAPI docs at /docs, Prometheus metrics at /metrics).
# Without a config file it runs in open-access mode (no API keys) and listens on loopback only;
# pass `--config FILE` (tenants, tiers, limits: see docs/api.md) for anything else.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
configured=false
for arg in "$@"; do
  case "$arg" in --config|--config=*) configured=true ;; esac
done
if [ "$configured" = false ]; then
  export KVTIER_OPEN_ACCESS="${KVTIER_OPEN_ACCESS:-true}" KVTIER_SERVER__HOST="${KVTIER_SERVER__HOST:-127.0.0.1}"
fi
exec .venv/bin/kvtier serve "$@"
