# syntax=docker/dockerfile:1
# The one kubemoe image: operator, router, worker and the local tools are subcommands of the
# same binary (`kubemoe operator`, `kubemoe router`, `kubemoe worker`, ...).
#
#   docker build -t ghcr.io/kubemoe/kubemoe:0.1.0 .
#
# The runtime stage is distroless (glibc, no shell) and runs as the `nonroot` user 65532, the
# user the operator's pods and the chart's securityContext expect; the root filesystem can be
# read-only (the operator mounts a writable /tmp). The binary computes on the CPU only: there
# are no GPU kernels yet.

ARG RUST_IMAGE=rust:1.89-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and build artefacts between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin kubemoe \
 && install -D target/release/kubemoe /out/kubemoe

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/kubemoe /usr/local/bin/kubemoe
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kubemoe"]
CMD ["operator"]
