#!/usr/bin/env bash
# Installs the real tools ringcache's tests and docs use, built from the Go
# module proxy, into a cache directory. Idempotent: a tool already built at
# the pinned version is not rebuilt.
#
#   scripts/install-tools.sh [grpcurl ...]    # default: every tool
#
# Prints the tools' bin directory on its last line. Override the location
# with RINGCACHE_TOOLS (default: ~/.cache/ringcache/tools).
set -euo pipefail
# Every temporary build tree lives under one directory, removed however the
# script ends (an error, Ctrl-C): an interrupted build leaves nothing behind.
# (Module copies are made writable first: the module cache's are not.)
WORK="$(mktemp -d -t ringcache-build.XXXXXX)"
trap 'chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

TOOLS_DIR="${RINGCACHE_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/ringcache/tools}"
BIN_DIR="$TOOLS_DIR/bin"
mkdir -p "$BIN_DIR"

# name -> "go package@version"
declare -A PACKAGES=(
  [grpcurl]="github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4"
  [helm]="helm.sh/helm/v3/cmd/helm@v3.22.0"
  # Jaeger v2 lives in ./cmd/jaeger of the v1.7x module tags. Its go.mod has
  # replace directives, so `go install` refuses it: see install_jaeger.
  [jaeger]="github.com/jaegertracing/jaeger@v1.76.0"
  # Go stubs from proto/ (scripts/gen-go.sh): buf and its two plugins.
  # The chart's alerts: promtool check rules / test rules (scripts/check-helm.sh).
  [promtool]="github.com/prometheus/prometheus/cmd/promtool@v0.316.0"
  [buf]="github.com/bufbuild/buf/cmd/buf@v1.75.0"
  [protoc-gen-go]="google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12"
  [protoc-gen-go-grpc]="google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2"
)

install_go_tool() {
  local name="$1" spec="${PACKAGES[$1]}"
  local version="${spec##*@}"
  local stamp="$BIN_DIR/.$name.version"
  if [[ -x "$BIN_DIR/$name" && -f "$stamp" && "$(cat "$stamp")" == "$version" ]]; then
    return 0
  fi
  command -v go >/dev/null || { echo "install-tools: go is needed to build $name" >&2; exit 1; }
  echo "install-tools: building $name $version from the Go module proxy" >&2
  # Build into a temporary directory and move into place, so an interrupted
  # build never leaves a half-written binary behind.
  local tmp
  tmp="$(mktemp -d -p "$WORK")"
  GOBIN="$tmp" GOFLAGS="${GOFLAGS:--buildvcs=false}" go install "$spec"
  mv "$tmp/$name" "$BIN_DIR/$name"
  rmdir "$tmp"
  echo "$version" > "$stamp"
}

# Jaeger: download the module, copy it somewhere writable (the module cache
# is read-only) and build ./cmd/jaeger inside it, so its replace directives
# apply.
install_jaeger() {
  local spec="${PACKAGES[jaeger]}"
  local version="${spec##*@}"
  local stamp="$BIN_DIR/.jaeger.version"
  if [[ -x "$BIN_DIR/jaeger" && -f "$stamp" && "$(cat "$stamp")" == "$version" ]]; then
    return 0
  fi
  command -v go >/dev/null || { echo "install-tools: go is needed to build jaeger" >&2; exit 1; }
  echo "install-tools: building jaeger $version (v2) from the Go module proxy; this takes a few minutes once" >&2
  local dir tmp
  dir="$(go mod download -json "$spec" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [[ -n "$dir" && -d "$dir" ]] || { echo "install-tools: cannot download $spec" >&2; exit 1; }
  tmp="$(mktemp -d -p "$WORK")"
  cp -r "$dir/." "$tmp/src"
  chmod -R u+w "$tmp/src"
  (cd "$tmp/src" && GOFLAGS="${GOFLAGS:--buildvcs=false}" go build -o "$tmp/jaeger" ./cmd/jaeger)
  mv "$tmp/jaeger" "$BIN_DIR/jaeger"
  rm -rf "$tmp"
  echo "$version" > "$stamp"
}

# Rust tools, from crates.io: name -> version.
declare -A CRATES=(
  # The supply-chain check (licenses, bans, sources) in scripts/test.sh.
  [cargo-deny]="0.20.2"
)

install_cargo_tool() {
  local name="$1" version="${CRATES[$1]}"
  local stamp="$BIN_DIR/.$name.version"
  if [[ -x "$BIN_DIR/$name" && -f "$stamp" && "$(cat "$stamp")" == "$version" ]]; then
    return 0
  fi
  echo "install-tools: building $name $version from crates.io; this takes a few minutes once" >&2
  local tmp
  tmp="$(mktemp -d -p "$WORK")"
  cargo install --quiet --locked --version "$version" --root "$tmp" "$name"
  mv "$tmp/bin/$name" "$BIN_DIR/$name"
  rm -rf "$tmp"
  echo "$version" > "$stamp"
}

tools=("$@")
[[ ${#tools[@]} -eq 0 ]] && tools=("${!PACKAGES[@]}" "${!CRATES[@]}")
for tool in "${tools[@]}"; do
  if [[ -n "${CRATES[$tool]:-}" ]]; then
    install_cargo_tool "$tool"
    continue
  fi
  [[ -n "${PACKAGES[$tool]:-}" ]] || { echo "install-tools: unknown tool '$tool'" >&2; exit 2; }
  case "$tool" in
    jaeger) install_jaeger ;;
    *) install_go_tool "$tool" ;;
  esac
done
echo "$BIN_DIR"
