#!/usr/bin/env bash
# Catches a step that works only because this machine's caches already hold
# what it needs (a missing fetch). It fills *empty* cargo and Go module
# caches with scripts/fetch.sh alone, then runs every step scripts/test.sh
# runs offline, and what the Go builds resolve, with the network cut off
# (CARGO_NET_OFFLINE, GOPROXY=off). Each must find all it needs.
#
#   scripts/check-fresh.sh
#
# It downloads the crates and modules again into a temporary directory
# (about a minute) and deletes it afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

# cargo-deny itself comes from the tool cache (installed by test.sh's first
# step), found before the caches are swapped.
deny="$(scripts/install-tools.sh cargo-deny | tail -n 1)/cargo-deny"

fresh="$(mktemp -d)"
trap 'chmod -R u+w "$fresh" 2>/dev/null; rm -rf "$fresh"' EXIT
mkdir -p "$fresh/cargo" "$fresh/gomod"
# The toolchain stays where rustup put it; only the download caches are new.
export CARGO_HOME="$fresh/cargo" GOMODCACHE="$fresh/gomod"
[[ -f "$HOME/.cargo/config.toml" ]] && cp "$HOME/.cargo/config.toml" "$CARGO_HOME/"

echo "check-fresh: filling empty caches with scripts/fetch.sh" >&2
scripts/fetch.sh

export CARGO_NET_OFFLINE=true GOPROXY=off GOFLAGS=-mod=readonly
echo "check-fresh: offline steps against those caches only" >&2
cargo metadata --locked --offline --format-version 1 >/dev/null
"$deny" --offline check licenses bans sources 2>/dev/null
for module in clients/go examples/go-http-service; do
  (cd "$module" && go list -deps -test ./... >/dev/null)
done
echo "check-fresh: ok: everything the offline steps need comes from scripts/fetch.sh"
