#!/usr/bin/env bash
# Runs every benchmark script once with the smallest arguments that exercise it (~10 minutes on 2
# CPUs), to check that they still run after an interface changed: benchmarks are not tests, so CI
# does not run them, and a script that fails is a BENCHMARKS.md figure nobody can reproduce (two
# had: attend_cached.py passed a removed argument, modular.py named pathways with spaces after
# names were confined). Figures from it mean nothing; records go to a temporary folder.
#
#   tools/dev_env.sh [--torch]; tools/bench/smoke.sh [NAME ...]    (default: all; from the repo root)
#
# Prints one line per script (exit status, seconds) and exits 1 if any failed; each log is kept.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/py312/bin/python
[ -x "$PY" ] || { echo "smoke: run tools/dev_env.sh first (no $PY)"; exit 2; }
export PYTHONPATH=libs:.:build/gen
O="$(mktemp -d "${TMPDIR:-/tmp}/pathways-bench-smoke.XXXXXX")"
failed=0

bench() {  # NAME ARGS...: one script, its log in $O/NAME.log
  local name=$1 start rc
  shift
  if [ -n "$only" ] && [[ " $only " != *" $name "* ]]; then return; fi
  start=$(date +%s)
  timeout 600 "$PY" -m "tools.bench.$name" "$@" >"$O/$name.log" 2>&1
  rc=$?
  printf '%-20s rc=%-3s %4ss\n' "$name" "$rc" "$(($(date +%s) - start))"
  [ "$rc" = 0 ] || failed=1
}

only="$*"
bench attend_cached --repeat 1 --json "$O/attend_cached.json"
bench backend_choice --spec examples/tiny.yaml --steps 4 --repeat 1 --json "$O/backend_choice.json"
bench decode_rows --repeat 1 --json "$O/decode_rows.json"
bench local_decode --specs examples/tiny.yaml --repeat 1 --new-tokens 4 --out "$O/local_decode.json"
bench remote_decode --spec examples/tiny.yaml --tokens 4 --rounds 1 --modes float32:stream \
  --concurrency 1,2 --batch-rounds 1 --json "$O/remote_decode.json"
bench colocate_decode --tokens 4 --rounds 1 --sessions 2 --json "$O/colocate_decode.json"
bench device_decode --specs examples/tiny.yaml --prompt-len 16 --new-tokens 4 --sessions 2 \
  --out "$O/device_decode.json"
bench big_pathway --spec examples/tiny.yaml --tokens 2 --prompt-len 4 --out "$O/big_pathway.json"
bench module_start_memory --spec examples/tiny.yaml --module attn-0 \
  --out "$O/module_start_memory.json"
XLA_FLAGS=--xla_force_host_platform_device_count=2 \
  bench sharding --specs examples/tiny.yaml --tp 2 --repeat 1 --new-tokens 4 --out "$O/sharding.json"
bench grpc_hop --calls 5 --gaps-ms 0,1 --json "$O/grpc_hop.json"
bench chain_topology --tokens 3 --rounds 1 --json "$O/chain_topology.json"
bench train --steps 1 --micro 1 --seq-len 32 --batch-size 4 --out "$O/train.json"
bench modular --steps 30 --module-steps 30 --rows 32 --workers 1 --e2e-max-steps 40 \
  --work "$O/modular" --out "$O/modular.json"
bench path_parallel --quick --steps 12 --inner 3 12 --out "$O/path_parallel.json"
bench applications --tasks vision --seeds 0 --steps 60 --warmup 5 --out "$O/applications.json"
bench robotics --tasks reacher --steps 5 --test-episodes 1 --out "$O/robotics.json"
bench robotics_serving --tasks reacher --episodes 1 --concurrency 1 --out "$O/robotics_serving.json"
bench infer_latency --requests 10 --warmup 2 --out "$O"
bench http_front --tokens 4 --rounds 1 --streams 1 2 --out "$O"
bench http_soak --clients 2 --seconds 5 --tokens 4 --out "$O"
bench soak --clients 2 --seconds 10 --warmup 2 --out "$O"
bench rollout --clients 2 --long 1 --long-tokens 20 --seconds 5 --warmup 1 --out "$O/rollout.json"
bench fuzz --calls 200 --out "$O"
if [ -x .venv/py311-torch/bin/python ]; then
  bench hf_decode --sides pathways,pathways-xla,transformers --repeat 1 --new-tokens 4 \
    --prompt-len 16 --hf-dir "$O/hf" --out "$O/hf_decode.json"
elif [ -z "$only" ] || [[ " $only " == *" hf_decode "* ]]; then
  echo "hf_decode            skipped: it needs torch (tools/dev_env.sh --torch)"
fi
echo "logs: $O"
exit "$failed"
