#!/usr/bin/env bash
# Downloads every Rust crate and Go module the build, the tests and the
# offline checks need, for every platform in Cargo.lock (cargo-deny reads
# the metadata of all of them, not only this machine's). scripts/test.sh
# runs it before any step that works offline; scripts/check-fresh.sh proves,
# with empty caches, that nothing later needs more than this fetched.
#
#   scripts/fetch.sh
#
# Honours CARGO_HOME and GOMODCACHE, so it can fill caches other than yours.
set -euo pipefail
cd "$(dirname "$0")/.."

# Without --target, cargo fetch takes the crates of every platform.
cargo fetch --locked --quiet
for module in clients/go examples/go-http-service; do
  (cd "$module" && go mod download)
done
