# tether: one entry point for building, testing and running locally.
CARGO ?= cargo

.PHONY: build release test lint fmt demo clean

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

## tether's main job on this machine, no cluster needed.
demo: release
	./target/release/tether-demo

clean:
	$(CARGO) clean
