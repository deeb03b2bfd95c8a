#!/usr/bin/env bash
# A real multi-node Ray cluster on this machine (head + N workers, token auth on).
#   cluster/local.sh up [--workers N] [--cpus-per-worker C] [--head-cpus C]
#   cluster/local.sh status [--json]
#   cluster/local.sh stop-node w2          # fault drill: SIGKILL one worker node's processes
#   cluster/local.sh start-node w2         # start it again (a new node id, the same name)
#   cluster/local.sh down                  # stops only the processes this cluster started
# State, token and logs live in $TLRAY_CLUSTER_DIR (default ~/.tl-ray/local-cluster).
# Each node gets its own node-local disk for fetched caches (TL_RAY_CACHE_DIR=<dir>/node-cache/<node>).
# Never uses `ray stop`: other Ray instances on the machine keep running.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${TLRAY_PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/../.venv/bin/python" ]]; then python="$here/../.venv/bin/python"; else python="$(command -v python3)"; fi
fi
exec "$python" "$here/local_cluster.py" "$@"
