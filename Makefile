# tether: one entry point for building, testing and running locally.
CARGO ?= cargo
VENV ?= .venv
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
IMAGE ?= ghcr.io/tether-dev/tether

.PHONY: build release test cargo-test chart-test chart-lint lint fmt demo bench bench-quick crds run-operator e2e docker clean

build:
	$(CARGO) build --workspace --bins

release:
	$(CARGO) build --workspace --release --bins

## The test command (README, CI): Rust unit, integration and end-to-end tests
## on loopback, then the Helm charts rendered and validated offline.
test: cargo-test chart-test

cargo-test:
	$(CARGO) test --workspace

$(VENV)/.installed: charts/tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r charts/tests/requirements.txt
	touch $@

## Charts: helm lint (Helm's Go SDK via helm-python-sdk), render with default
## and non-default values, kubernetes-validate --strict, security checks.
chart-test: $(VENV)/.installed
	$(CARGO) build -q -p tether-operator --bin kubectl-tether
	$(VENV)/bin/python -m pytest -q charts/tests

## With a real helm binary when there is one; otherwise Helm's SDK.
chart-lint:
	@if command -v helm >/dev/null 2>&1; then \
		helm lint --strict charts/tether && \
		helm lint --strict charts/tether-agent --set clusterId=demo --set credentials.existingSecret=tether-agent; \
	else \
		$(MAKE) $(VENV)/.installed && $(VENV)/bin/python -m pytest -q charts/tests -k lint; \
	fi

## Formatting and lints, as CI checks them.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Regenerate the CRD from the Rust types, in crds/ and in the chart.
crds:
	$(CARGO) run -q -p tether-operator --bin crdgen crds/proxiedclusters.tether.dev.yaml
	cp crds/proxiedclusters.tether.dev.yaml charts/tether/crds/

## The operator on this machine against the cluster of $$KUBECONFIG.
run-operator:
	kubectl apply -f crds/
	$(CARGO) run -p tether-operator --bin tether-operator -- --namespace $${NAMESPACE:-tether-system} --leader-election=false

## Against a real cluster: TETHER_E2E_KUBECONFIG=path make e2e (skips without it).
e2e: $(VENV)/.installed
	$(CARGO) build --workspace --bins
	$(CARGO) test -p tether-e2e -- --nocapture --test-threads=1

## One image with all binaries (needs a Docker engine).
docker:
	docker build -t $(IMAGE):$(VERSION) .

## Tunnel vs direct, side by side; prints a table and writes BENCHMARKS.md.
bench:
	$(CARGO) build --release --workspace --bins
	$(CARGO) run --release -p tether-bench

## The same in a few seconds, writing nothing (CI checks that it runs).
bench-quick:
	$(CARGO) build -q --workspace --bins
	$(CARGO) run -q -p tether-bench -- --quick --output -

## tether's main job on this machine, no cluster needed.
demo: release
	./target/release/tether-demo

clean:
	$(CARGO) clean
	rm -rf $(VENV)
