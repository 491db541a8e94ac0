# syntax=docker/dockerfile:1
# ringcache: one image with both binaries, cache-node and orchestrator.
#
#   docker build -t registry.example.com/ringcache:0.1.0 .
#
# (Without a Docker daemon, scripts/build-image.sh assembles the same
# runtime image from locally built binaries with umoci.)
#
# Three build stages, so that a change to ringcache's own code rebuilds only
# ringcache: the dependencies are compiled in a layer of their own, keyed on
# the manifests and Cargo.lock alone (cargo-chef's "recipe").
FROM rust:1.95-slim-bookworm AS chef
RUN cargo install --locked --version 0.1.78 cargo-chef
WORKDIR /src

# 1. The recipe: every Cargo.toml and Cargo.lock, nothing else. Changes
#    only when dependencies do.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# 2. The dependencies, compiled from the recipe (cached while it is
#    unchanged), then ringcache itself. The protos compile with cargo alone
#    (protox), so no protoc is needed. The image profile: release without
#    debug info; symbol names stay, for backtraces.
FROM chef AS build
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --profile image --locked --recipe-path recipe.json
COPY . .
RUN cargo build --profile image --locked --bins \
    && mkdir -p /out \
    && cp target/image/cache-node target/image/orchestrator /out/

# 3. Runtime: distroless (glibc, CA certificates, no shell, no package
#    manager), running as the image's unprivileged "nonroot" user (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/cache-node /out/orchestrator /usr/local/bin/
USER 65532:65532
EXPOSE 50051 50061 9090 9091
# The chart picks the binary with `command`; on its own the image runs a
# single cache node.
ENTRYPOINT ["/usr/local/bin/cache-node"]
