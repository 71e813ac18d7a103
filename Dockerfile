# One image holds every tether binary (server, operator, agent, kubectl
# plugin): a customer mirrors a single image into an air-gapped registry, and
# the operator's bundles reference the same digest the management side runs.
# syntax=docker/dockerfile:1.7
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/*
RUN rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
# Static binaries (musl): no libc in the runtime image.
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
      --bin tether-server --bin tether-agent --bin tether-operator --bin kubectl-tether \
 && mkdir /out \
 && cp target/x86_64-unknown-linux-musl/release/tether-server \
       target/x86_64-unknown-linux-musl/release/tether-agent \
       target/x86_64-unknown-linux-musl/release/tether-operator \
       target/x86_64-unknown-linux-musl/release/kubectl-tether /out/

# Distroless static: no shell, no package manager, non-root (65532).
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tether-server"]
