# shoal developer entry points. `make test` is what CI runs (via .ci/run).
SHELL := /bin/bash
CARGO ?= cargo
SHOAL := target/debug/shoal
# The test cluster lives under target/ so `cargo clean` removes it with everything else.
TEST_CLUSTER ?= $(CURDIR)/target/shoal-test-cluster
DEMO_CLUSTER ?= $(CURDIR)/.shoal-dev
KUBECTL := $(HOME)/.cache/shoal/k8s-v1.35.4/bin/kubectl
TEST_THREADS ?= 8

# `make image`: release build; `make image PROFILE=debug` reuses the debug build (faster).
PROFILE ?= release
IMAGE ?= shoal:$(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)

.PHONY: cluster build crds test lint demo demo-down fmt image loadtest

## Build the local control plane into ~/.cache/shoal (a no-op when cached).
cluster:
	bash tests/cluster/build.sh

build:
	$(CARGO) build --bins --tests

## Formatting and lints, as CI runs them.
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

## An OCI image archive, target/shoal-image.tar, built with buildah (no Docker daemon, no
## base image pulled): the binary, its shared libraries, a non-root user. Load it with
## `skopeo copy oci-archive:target/shoal-image.tar docker://<registry>/shoal:<tag>` or
## `podman load`. Users with Docker build the Dockerfile instead.
image:
	$(CARGO) build $(if $(filter release,$(PROFILE)),--release,) --bin shoal
	bash image/build.sh target/$(PROFILE)/shoal target/shoal-image.tar $(IMAGE)

## Regenerate crds/ from the Rust types.
crds: build
	$(SHOAL) crds --dir crds

## Every test: unit, property and integration tests against one fresh local control plane.
test: cluster build
	$(SHOAL) dev down --dir $(TEST_CLUSTER)
	$(SHOAL) dev up --dir $(TEST_CLUSTER)
	SHOAL_TEST_KUBECONFIG=$(TEST_CLUSTER)/kubeconfig $(CARGO) test -- --test-threads=$(TEST_THREADS); \
	  rc=$$?; $(SHOAL) dev down --dir $(TEST_CLUSTER); exit $$rc

## The standard load scenarios, one after another, each on a fresh local control plane with
## the operator's release build; reports in loadtest/reports/ (see loadtest/README.md).
LOADTEST_SCENARIOS ?= diamond-1000-r1 diamond-1000-r2 diamond-1000-r3 diamond-1000-r3-chaos diamond-1000-r1-pod diamond-1000-r3-pod diamond-1000-r3-chaos-pod diamond-1000-r1-paced diamond-5000-r3 chain-10000-live-r3 nsman-ttl-10000-r1
loadtest: cluster
	$(CARGO) build --release --bin shoal
	target/release/shoal loadtest $(LOADTEST_SCENARIOS)

## Start the local control plane, Prometheus and Jaeger, install the CRDs, start two
## operator replicas (traced to Jaeger, scraped by Prometheus) and apply the samples.
demo: cluster build
	$(SHOAL) dev up --dir $(DEMO_CLUSTER)
	bash tests/cluster/observability.sh $(DEMO_CLUSTER) start
	KUBECONFIG=$(DEMO_CLUSTER)/kubeconfig $(KUBECTL) create namespace shoal-system --dry-run=client -o yaml | KUBECONFIG=$(DEMO_CLUSTER)/kubeconfig $(KUBECTL) apply -f -
	for r in 1 2; do \
	  if ! { test -f $(DEMO_CLUSTER)/shoal-$$r.pid && kill -0 $$(cat $(DEMO_CLUSTER)/shoal-$$r.pid) 2>/dev/null; }; then \
	    env KUBECONFIG=$(DEMO_CLUSTER)/kubeconfig $$(test -f $(DEMO_CLUSTER)/jaeger.pid && echo OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 OTEL_SERVICE_NAME=shoal) nohup $(SHOAL) run --identity demo-$$r --namespace shoal-system \
	      --metrics-addr 127.0.0.1:$$((18080 + $$r)) > $(DEMO_CLUSTER)/shoal-$$r.log 2>&1 & echo $$! > $(DEMO_CLUSTER)/shoal-$$r.pid; \
	  fi; \
	done
	KUBECONFIG=$(DEMO_CLUSTER)/kubeconfig $(KUBECTL) apply --server-side -f examples/
	sleep 8; KUBECONFIG=$(DEMO_CLUSTER)/kubeconfig $(KUBECTL) get shoal -A
	@echo "export KUBECONFIG=$(DEMO_CLUSTER)/kubeconfig"
	@echo "metrics:    http://127.0.0.1:18081/metrics and :18082/metrics"
	@test -f $(DEMO_CLUSTER)/prometheus.pid && echo "Prometheus: http://127.0.0.1:9090 (scrapes both replicas)" || true
	@test -f $(DEMO_CLUSTER)/jaeger.pid && echo "Jaeger:     http://127.0.0.1:16686 (service shoal)" || true
	@echo "dashboard:  docs/grafana-dashboard.json (import it into a Grafana with the Prometheus above as its data source)"
	@echo "stop with:  make demo-down"

demo-down:
	-for f in $(DEMO_CLUSTER)/shoal-*.pid; do test -f $$f && kill $$(cat $$f) 2>/dev/null; rm -f $$f; done
	bash tests/cluster/observability.sh $(DEMO_CLUSTER) stop
	$(SHOAL) dev down --dir $(DEMO_CLUSTER)
