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

TOOLS_DIR="${RINGCACHE_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/ringcache/tools}"
BIN_DIR="$TOOLS_DIR/bin"
mkdir -p "$BIN_DIR"

# name -> "go package@version"
declare -A PACKAGES=(
  [grpcurl]="github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4"
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
  tmp="$(mktemp -d)"
  GOBIN="$tmp" GOFLAGS="${GOFLAGS:--buildvcs=false}" go install "$spec"
  mv "$tmp/$name" "$BIN_DIR/$name"
  rmdir "$tmp"
  echo "$version" > "$stamp"
}

tools=("$@")
[[ ${#tools[@]} -eq 0 ]] && tools=("${!PACKAGES[@]}")
for tool in "${tools[@]}"; do
  [[ -n "${PACKAGES[$tool]:-}" ]] || { echo "install-tools: unknown tool '$tool'" >&2; exit 2; }
  install_go_tool "$tool"
done
echo "$BIN_DIR"
