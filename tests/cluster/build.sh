#!/usr/bin/env bash
# Builds the local control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok) from the Go modules pinned in go.mod, into a cache
# outside the repository (SHOAL_CACHE_DIR, default ~/.cache/shoal). A second run finds the
# binaries and does nothing. Pinned: Kubernetes v1.35.4 and etcd v3.6.16 (go.mod here),
# kwok v0.7.0 (kwok/go.mod, because it needs an older apimachinery), helm v3.22.0 (helm/go.mod;
# a cached helm of another version is rebuilt), Jaeger v1.76.0 (jaeger/go.mod; for the
# tracing test, about 4 min on 2 cores).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
K8S_VERSION=v1.35.4
CACHE="${SHOAL_CACHE_DIR:-$HOME/.cache/shoal}/k8s-${K8S_VERSION}"
BIN="$CACHE/bin"
mkdir -p "$BIN"
cd "$here"
export GOFLAGS="${GOFLAGS:--buildvcs=false}"
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=${K8S_VERSION} -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=35 -X k8s.io/client-go/pkg/version.gitVersion=${K8S_VERSION}"
build() { # name package [module dir] [ldflags] [stale: rebuild even if cached]
  local name="$1" pkg="$2" mod="${3:-$here}" flags="${4:-$ldflags}" stale="${5:-}"
  if [[ -x "$BIN/$name" && -z "$stale" ]]; then echo "cached: $name"; return 0; fi
  local t0=$SECONDS
  (cd "$mod" && go build -trimpath -ldflags "$flags" -o "$BIN/$name.tmp" "$pkg")
  mv "$BIN/$name.tmp" "$BIN/$name"
  echo "built: $name in $((SECONDS - t0)) s"
}
t0=$SECONDS
go mod download
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager
build kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler
build kubectl k8s.io/kubernetes/cmd/kubectl
build etcd go.etcd.io/etcd/server/v3
# kwok v0.7.0 needs apimachinery v0.33, so it has a module of its own.
(cd "$here/kwok" && go mod download)
build kwok sigs.k8s.io/kwok/cmd/kwok "$here/kwok"
# helm, to render, lint and install the chart in helm/ (its own module: it pins its own
# client-go). It reports the version it was built from, so a version bump rebuilds it.
(cd "$here/helm" && go mod download)
# The new binary replaces the old one in one rename, so nothing running meanwhile misses it.
helm_version="$(cd "$here/helm" && go list -m -f '{{.Version}}' helm.sh/helm/v3)"
stale=""
if [[ -x "$BIN/helm" && "$("$BIN/helm" version --template '{{.Version}}' 2>/dev/null)" != "$helm_version" ]]; then
  echo "helm in the cache is not $helm_version: rebuilding it"
  stale=1
fi
build helm helm.sh/helm/v3/cmd/helm "$here/helm" "-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version" "$stale"
# Jaeger v2 (all-in-one), for the tracing test. Its own module, which repeats Jaeger's replace
# directive; a few of its dependencies are missing from the checksum database, hence GONOSUMDB
# for exactly those. Only this script's copy in the repository has jaeger/ (`shoal dev up`
# builds the control plane alone).
if [[ -f "$here/jaeger/go.mod" ]]; then
  GONOSUMDB=go.opentelemetry.io/collector,github.com/open-telemetry/opentelemetry-collector-contrib \
    build jaeger github.com/jaegertracing/jaeger/cmd/jaeger "$here/jaeger" "-s -w"
fi
echo "control plane binaries ready in $BIN ($((SECONDS - t0)) s)"
