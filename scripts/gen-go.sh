#!/usr/bin/env bash
# Generates the Go stubs (clients/go/gen) from proto/: the public API, and
# the node API direct mode follows (change feeds, debt records),
# with buf and the protoc-gen-go / protoc-gen-go-grpc plugins built from the
# Go module proxy by scripts/install-tools.sh (no system protoc).
#
#   scripts/gen-go.sh            # regenerate clients/go/gen
#   scripts/gen-go.sh --check    # fail if clients/go/gen is not up to date
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$(scripts/install-tools.sh buf protoc-gen-go protoc-gen-go-grpc | tail -n 1)"
export PATH="$bin:$PATH"

if [[ "${1:-}" == "--check" ]]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  cp -r clients/go/buf.gen.yaml "$tmp/"
  (cd clients/go && buf generate --template buf.gen.yaml -o "$tmp")
  if ! diff -r "$tmp/gen" clients/go/gen; then
    echo "gen-go: clients/go/gen is out of date with proto/: run scripts/gen-go.sh" >&2
    exit 1
  fi
  echo "gen-go: clients/go/gen is up to date"
  exit 0
fi
rm -rf clients/go/gen
(cd clients/go && buf generate --template buf.gen.yaml)
echo "gen-go: wrote clients/go/gen"
