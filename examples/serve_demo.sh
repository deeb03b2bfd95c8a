#!/usr/bin/env bash
# Deploy an experiment's best trial on the embedded local Ray, query it over HTTP (with the
# tl-ray client and with curl), then stop the endpoint. Used by `make demo`.
#   examples/serve_demo.sh runs/demo [PORT]
set -euo pipefail
experiment=${1:?usage: serve_demo.sh EXPERIMENT_DIR [PORT]}
port=${2:-8000}
bin="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
url="http://127.0.0.1:$port"

"$bin/tl-ray" serve "$experiment" --port "$port" --max-replicas 2 >"$experiment/serve.log" 2>&1 &
server=$!
stop() {
    kill -TERM "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
}
trap stop EXIT
trap 'echo "serving failed; last lines of $experiment/serve.log:" >&2; tail -n 20 "$experiment/serve.log" >&2' ERR

echo "== tl-ray query $url (waits for the endpoint to come up)"
"$bin/tl-ray" query "$url" --wait 240 \
    "a moving, beautifully acted film" "dull, clumsy and far too long" "not bad at all"
echo "== curl $url/v1/predict"
curl -sS --fail-with-body -X POST "$url/v1/predict" -H 'Content-Type: application/json' \
    -d '{"texts": ["an instant classic", "a waste of two hours"]}'
echo
echo "== the served model: curl $url/v1/model"
curl -sS --fail-with-body "$url/v1/model"
echo
