#!/usr/bin/env bash
# Runs ringcache's whole test suite, installing what the tests need first.
#
#   scripts/test.sh
#
# Steps: fetch every crate and Go module (scripts/fetch.sh) before any
# offline step, install the real tools the tests drive (grpcurl, Jaeger,
# helm, buf from the Go module proxy; cargo-deny from crates.io; all
# cached), check formatting and lints, check the supply chain (cargo deny:
# licenses, bans, sources), prove with empty caches that the fetch step
# fetched all the offline steps need (scripts/check-fresh.sh), run every
# test (unit tests, benchmarks in test mode, the integration tests that
# start the real binaries), then the Go client and example (stubs up to
# date, go vet, go test), then the Helm chart and the Dockerfile, then the
# container image (built and run with podman).
#
# The chart on a real Kubernetes control plane is a second, slower command:
# scripts/test-k8s.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "fetching crates and Go modules (everything later steps need offline)"
scripts/fetch.sh

step "installing test tools"
scripts/install-tools.sh
# The benchmark against twemproxy + Redis runs a smoke pass in the tests.
scripts/install-debs.sh peers
# The image test builds and runs the image without a Docker daemon.
scripts/install-debs.sh image

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo deny: licenses, bans, sources (deny.toml; offline)"
"$(scripts/install-tools.sh cargo-deny | tail -n 1)/cargo-deny" --offline check licenses bans sources

step "fresh caches: the offline steps need nothing scripts/fetch.sh does not fetch"
scripts/check-fresh.sh

step "cargo test"
cargo test --workspace --all-targets --locked

step "Go client and example: stubs up to date, go vet, go test"
scripts/gen-go.sh --check
# The Go client's tests start the real binaries (built by cargo test above).
cargo build --bins --locked
(cd clients/go && go vet ./... && RINGCACHE_BIN_DIR="$PWD/../../target/debug" go test -count=1 ./...)
(cd examples/go-http-service && go vet ./... && go test -count=1 ./...)

step "helm chart and Dockerfile"
scripts/check-helm.sh

step "container image: built without Docker, run with podman"
scripts/test-image.sh --bin-dir target/debug
