# tether: one entry point for building, testing and running locally.
CARGO ?= cargo
VENV ?= .venv
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
IMAGE ?= ghcr.io/tether-dev/tether

.PHONY: build release test cargo-test chart-test chart-lint lint fmt demo bench bench-quick crds run-operator e2e e2e-pods docker static-rootfs image image-import clean

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
	$(VENV)/bin/python -m pytest -q charts/tests image

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

## One image with all binaries, with a Docker engine.
docker:
	docker build -t $(IMAGE):$(VERSION) .

TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
STATIC_TARGET ?= x86_64-unknown-linux-gnu
PROGRAMS = tether-server tether-agent tether-operator kubectl-tether
ROOTFS ?= $(TARGET_DIR)/image/rootfs
IMAGE_ARCHIVE ?= $(TARGET_DIR)/image/tether.tar

## The image's whole filesystem: the four programs, statically linked
## (glibc's crt-static; rustls on ring, no OpenSSL), in $(ROOTFS)/usr/local/bin.
static-rootfs:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --locked \
		--target $(STATIC_TARGET) $(PROGRAMS:%=--bin %)
	rm -rf $(ROOTFS) && mkdir -p $(ROOTFS)/usr/local/bin
	install -m 0755 $(PROGRAMS:%=$(TARGET_DIR)/$(STATIC_TARGET)/release/%) $(ROOTFS)/usr/local/bin/

## An OCI image archive named as the chart's default image, without a Docker
## engine (buildah); the same source gives a byte-identical archive.
image: static-rootfs
	image/build.sh $(ROOTFS) $(IMAGE):$(VERSION) $(IMAGE_ARCHIVE)

## Loads the archive into the containerd of ../shared/tools/realk8s-node-up.
image-import:
	image/import.sh $(IMAGE_ARCHIVE) $(IMAGE):$(VERSION)

## The chart and the agent bundle as real pods: a cluster whose node runs
## pods, with the image imported (README, "On a real cluster").
## TETHER_E2E_POD_KUBECONFIG=path make e2e-pods (skips without it).
e2e-pods: $(VENV)/.installed
	$(CARGO) build -p tether-operator --bin kubectl-tether
	$(CARGO) test -p tether-e2e --test pods -- --nocapture --test-threads=1

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
