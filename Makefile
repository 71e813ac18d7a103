# tether: one entry point for building, testing and running locally.
CARGO ?= cargo

.PHONY: build release test lint fmt demo crds run-operator e2e clean

build:
	$(CARGO) build --workspace --bins

release:
	$(CARGO) build --workspace --release --bins

## The test command (README, CI): unit, integration, end-to-end on loopback.
test:
	$(CARGO) test --workspace

## Formatting and lints, as CI checks them.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Regenerate crds/ from the Rust types (a test fails when it is stale).
crds:
	$(CARGO) run -q -p tether-operator --bin crdgen crds/proxiedclusters.tether.dev.yaml

## The operator on this machine against the cluster of $$KUBECONFIG.
run-operator:
	kubectl apply -f crds/
	$(CARGO) run -p tether-operator --bin tether-operator -- --namespace $${NAMESPACE:-tether-system} --leader-election=false

## Against a real cluster: TETHER_E2E_KUBECONFIG=path make e2e (skips without it).
e2e:
	$(CARGO) build --workspace --bins
	$(CARGO) test -p tether-e2e -- --nocapture --test-threads=1

## tether's main job on this machine, no cluster needed.
demo: release
	./target/release/tether-demo

clean:
	$(CARGO) clean
