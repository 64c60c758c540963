#!/usr/bin/env bash
# `make demo`'s Prometheus and Jaeger next to the local control plane: both on loopback, with
# their data under DIR, stopped by `make demo-down` (observability.sh DIR stop).
#   observability.sh DIR start   Jaeger v2 (in-memory; OTLP HTTP 127.0.0.1:4318, UI and query
#                                API http://127.0.0.1:16686) from the control plane cache, and
#                                Debian's Prometheus (http://127.0.0.1:9090, exemplar storage on)
#                                scraping the demo replicas' /metrics on 127.0.0.1:18081-18082.
#   observability.sh DIR stop
# A tool that is missing is skipped with a note (Jaeger: `make cluster`; Prometheus:
# `apt-get install prometheus`, which .ci/run does).
set -euo pipefail
dir="$1"; cmd="${2:-start}"
bin="${SHOAL_CACHE_DIR:-$HOME/.cache/shoal}/k8s-v1.35.4/bin"
mkdir -p "$dir"
alive() { [[ -f "$dir/$1.pid" ]] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }

if [[ "$cmd" == stop ]]; then
  for p in jaeger prometheus; do
    if alive "$p"; then kill "$(cat "$dir/$p.pid")"; fi
    rm -f "$dir/$p.pid"
  done
  exit 0
fi

if alive jaeger; then
  echo "jaeger already running"
elif [[ -x "$bin/jaeger" ]]; then
  sed -e 's/{QUERY_HTTP}/16686/; s/{QUERY_GRPC}/16685/; s/{OTLP_GRPC}/4317/; s/{OTLP_HTTP}/4318/' \
    "$(dirname "$0")/jaeger/config.yaml" > "$dir/jaeger.yaml"
  nohup "$bin/jaeger" --config "file:$dir/jaeger.yaml" > "$dir/jaeger.log" 2>&1 &
  echo $! > "$dir/jaeger.pid"
else
  echo "no Jaeger in $bin (make cluster builds it): tracing stays off"
fi

prom="$(command -v prometheus || true)"
if alive prometheus; then
  echo "prometheus already running"
elif [[ -n "$prom" ]]; then
  cat > "$dir/prometheus.yml" <<'YAML'
global:
  scrape_interval: 5s
scrape_configs:
- job_name: shoal
  static_configs:
  - targets: ["127.0.0.1:18081", "127.0.0.1:18082"]
YAML
  mkdir -p "$dir/prometheus-data"
  nohup "$prom" --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/prometheus-data" \
    --web.listen-address=127.0.0.1:9090 --enable-feature=exemplar-storage > "$dir/prometheus.log" 2>&1 &
  echo $! > "$dir/prometheus.pid"
else
  echo "no prometheus on PATH (apt-get install prometheus): metrics are still on the replicas' /metrics"
fi
