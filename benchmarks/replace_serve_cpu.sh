#!/usr/bin/env bash
# Re-placement while serving, on the real server: serve.py on two host devices of this CPU
# (--xla_force_host_platform_device_count=2) with three SmolLM2 tenants (a, b: bf16;
# c: fireq-g32), placed a | b c, against 1.6 req/s for 360 s whose popularity moves on
# by one model every 120 s (bench serve --shift-s). Each round serves that trace twice,
# once with the placement left as it is and once with --rebalance-interval 10, and keeps
# the load client's record and the server's GET /admin/placement (the moves made).
#   bash benchmarks/replace_serve_cpu.sh        (two rounds; ROUNDS=N for another count)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
rounds="${ROUNDS:-2}"
port="${PORT:-8111}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
cat > "$work/placement.json" <<'EOF'
{"devices": [{"device": 0, "models": ["a"], "kv_budget_bytes": 12582912},
             {"device": 1, "models": ["b", "c"], "kv_budget_bytes": 12582912}]}
EOF

serve_once() {  # name, then serve.py options
  local name="$1"
  shift
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python serve.py --port "$port" \
    --placement "$work/placement.json" \
    --model a=smollm2-135m,precision=bf16,ttft-slo=920,tpot-slo=390 \
    --model b=smollm2-135m,precision=bf16,ttft-slo=920,tpot-slo=390 \
    --model c=smollm2-135m,precision=fireq-g32,ttft-slo=1050,tpot-slo=950 \
    --max-seqs 16 --max-prefill-tokens 64 --max-model-len 512 "$@" \
    > "$work/server_$name.log" 2>&1 &
  server=$!
  for _ in $(seq 900); do
    curl -sf "http://127.0.0.1:$port/v1/models" > /dev/null && break
    kill -0 "$server" 2>/dev/null || { tail -20 "$work/server_$name.log"; exit 1; }
    sleep 1
  done
  python -m fineserve_jax.bench serve --url "http://127.0.0.1:$port" --models a b c \
    --model-weights 6 3 1 --shift-s 120 --rate 1.6 --num-requests 576 \
    --prompt-len 64 --prompt-sigma 0.6 --output-len 16 --output-sigma 0.5 --max-len 255 \
    --seed 0 --no-chunk-times --out "$out/replace_serve_cpu_$name.json"
  curl -sf "http://127.0.0.1:$port/admin/placement" > "$out/replace_serve_cpu_${name}_placement.json"
  grep -E "rebalance check: replanned|: moved|skipped" "$work/server_$name.log" || true
  kill "$server"
  wait "$server" || true
}

for r in $(seq "$rounds"); do
  suffix=""
  [ "$rounds" -gt 1 ] && suffix="_$r"
  if [ $((r % 2)) = 1 ]; then  # alternate which runs first
    serve_once "fixed$suffix"
    serve_once "rebalance$suffix" --rebalance-interval 10
  else
    serve_once "rebalance$suffix" --rebalance-interval 10
    serve_once "fixed$suffix"
  fi
done
