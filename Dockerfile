# syntax=docker/dockerfile:1
# ringcache: one image with both binaries, cache-node and orchestrator.
#
#   docker build -t ghcr.io/ringcache/ringcache:0.1.0 .
#
# Build stage: release binaries. The protos compile with cargo alone (protox),
# so no protoc is needed.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# No debug info in the image (the release profile keeps line tables for
# profiling on a developer's machine); symbol names stay, for backtraces.
RUN CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    cargo build --release --locked --bins \
    && mkdir -p /out \
    && cp target/release/cache-node target/release/orchestrator /out/

# Runtime stage: distroless (glibc, CA certificates, no shell, no package
# manager), running as the image's unprivileged "nonroot" user (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/cache-node /out/orchestrator /usr/local/bin/
USER 65532:65532
EXPOSE 50051 50061 9090 9091
# The chart picks the binary with `command`; on its own the image runs a
# single cache node.
ENTRYPOINT ["/usr/local/bin/cache-node"]
