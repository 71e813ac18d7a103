# syntax=docker/dockerfile:1.7
# One image holds every tether binary (server, operator, agent, kubectl
# plugin): a customer mirrors a single image into an air-gapped registry, and
# the operator's bundles reference the same digest the management side runs.
# `make image` builds the same final stage without a Docker engine
# (image/build.sh derives its Containerfile from the stage below).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Static binaries (glibc with crt-static; rustls on ring, no OpenSSL): the
# runtime image holds nothing else. The same make target as `make image`.
RUN make static-rootfs ROOTFS=/rootfs

# --- runtime: no shell, no package manager, numeric non-root user (so
# runAsNonRoot can verify it).
FROM scratch
COPY --from=build /rootfs/ /
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tether-server"]
