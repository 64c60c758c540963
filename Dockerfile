# syntax=docker/dockerfile:1
# The shoal operator's image, for users: built from source, run as a non-root user.
#
#   docker build -t <your registry>/shoal:<tag> --build-arg REVISION=$(git rev-parse HEAD) .
#
# Two stages: a Rust toolchain builds `shoal` in release mode; the runtime is a slim Debian
# with only the binary added (it links glibc and libgcc_s, nothing else: TLS roots and time
# zones are compiled in). Any glibc base of the same Debian release works as RUNTIME_IMAGE,
# distroless's cc-debian12 image included. `make image` builds the same image on a machine
# without Docker (image/build.sh); tests/e2e/image.rs checks that both declare the same user,
# entrypoint, command and labels.
ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin shoal && cp target/release/shoal /shoal

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="shoal" \
      org.opencontainers.image.description="A highly available Kubernetes workflow operator whose replicas share the work through shard Leases." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /shoal /shoal
# The chart runs the pod as UID/GID 65532 with a read-only root filesystem.
USER 65532:65532
# /metrics, /healthz, /readyz
EXPOSE 8080
ENTRYPOINT ["/shoal"]
CMD ["run"]
