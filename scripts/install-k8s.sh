#!/usr/bin/env bash
# Builds a real Kubernetes control plane from the Go module proxy, for the
# chart's cluster tests (scripts/test-k8s.sh, scripts/test-kubelet.sh): etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and kwok
# (simulated nodes and pods); for a real node, kubelet, kube-proxy, CoreDNS,
# a static grpcurl and the source of Kubernetes' pause container. Idempotent: a binary already built at its pinned version is not
# rebuilt. Takes 10-20 minutes on 2 cores the first time.
#
#   scripts/install-k8s.sh
#
# Prints the bin directory on its last line (the same cache as
# scripts/install-tools.sh; override with RINGCACHE_TOOLS).
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
# kwok's stage files (what its simulated nodes and pods do) live beside.
STAGE_DIR="$TOOLS_DIR/kwok-stages"
mkdir -p "$BIN_DIR"

K8S_VERSION=v1.34.2
# The staging modules k8s.io/kubernetes replaces with ./staging/src/k8s.io/X
# are published as k8s.io/X at v0.<minor>.<patch>.
K8S_STAGING_VERSION=v0.34.2
ETCD_VERSION=v3.6.6
KWOK_VERSION=v0.8.0
COREDNS_VERSION=v1.12.4
GRPCURL_VERSION=v1.9.4
# Beside the binaries: pause.c and a static grpcurl, for the real node's
# images.
NODE_DIR="$TOOLS_DIR/node-images"

export GOFLAGS="${GOFLAGS:--buildvcs=false}"
export GOWORK=off
command -v go >/dev/null || { echo "install-k8s: go is needed" >&2; exit 1; }

# up_to_date NAME VERSION: the binary exists and was built at VERSION.
up_to_date() {
  [[ -x "$BIN_DIR/$1" && -f "$BIN_DIR/.$1.version" && "$(cat "$BIN_DIR/.$1.version")" == "$2" ]]
}

# module_copy MODULE@VERSION: a writable copy of the module's source (the
# module cache is read-only), printed as a directory.
module_copy() {
  local dir tmp
  dir="$(go mod download -json "$1" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [[ -n "$dir" && -d "$dir" ]] || { echo "install-k8s: cannot download $1" >&2; exit 1; }
  tmp="$(mktemp -d -p "$WORK")"
  cp -r "$dir/." "$tmp/src"
  chmod -R u+w "$tmp/src"
  echo "$tmp"
}

install_kubernetes() {
  local bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy) missing=0 b
  for b in "${bins[@]}"; do up_to_date "$b" "$K8S_VERSION" || missing=1; done
  [[ -f "$NODE_DIR/pause.c" ]] || missing=1
  [[ $missing -eq 0 ]] && return 0
  echo "install-k8s: building Kubernetes $K8S_VERSION (${bins[*]}) from the Go module proxy; this takes a while once" >&2
  local tmp
  tmp="$(module_copy "k8s.io/kubernetes@$K8S_VERSION")"
  (
    cd "$tmp/src"
    # A module zip holds one module only: the local replace directives of a
    # monorepo (./staging/src/k8s.io/X) point at directories that are not in
    # it. Point each at the published module of the same release instead.
    # Its go.work lists the staging directories too: build without it.
    rm -f go.work go.work.sum
    sed -i -E "s#^(\s*k8s\.io/[a-z0-9-]+) => \./staging/src/k8s\.io/[a-z0-9-]+\$#\1 => \1 $K8S_STAGING_VERSION#" go.mod
    GOFLAGS="$GOFLAGS -mod=mod" go mod download
    for b in "${bins[@]}"; do
      echo "install-k8s:   $b" >&2
      GOFLAGS="$GOFLAGS -mod=mod" go build \
        -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=34" \
        -o "$tmp/$b" "./cmd/$b"
    done
  )
  mkdir -p "$NODE_DIR"
  cp "$tmp/src/build/pause/linux/pause.c" "$NODE_DIR/pause.c"
  for b in "${bins[@]}"; do
    mv "$tmp/$b" "$BIN_DIR/$b"
    echo "$K8S_VERSION" > "$BIN_DIR/.$b.version"
  done
  rm -rf "$tmp"
}

install_coredns() {
  up_to_date coredns "$COREDNS_VERSION" && return 0
  echo "install-k8s: building CoreDNS $COREDNS_VERSION from the Go module proxy" >&2
  local tmp
  tmp="$(module_copy "github.com/coredns/coredns@$COREDNS_VERSION")"
  (cd "$tmp/src" && GOFLAGS="$GOFLAGS -mod=mod" go build -ldflags "-s -w" -o "$tmp/coredns" .)
  mv "$tmp/coredns" "$BIN_DIR/coredns"
  echo "$COREDNS_VERSION" > "$BIN_DIR/.coredns.version"
  rm -rf "$tmp"
}

# grpcurl without cgo: it runs in a container image with no libc (helm
# test's pod on the real node).
install_static_grpcurl() {
  [[ -x "$NODE_DIR/grpcurl" && "$(cat "$NODE_DIR/.grpcurl.version" 2>/dev/null)" == "$GRPCURL_VERSION" ]] && return 0
  mkdir -p "$NODE_DIR"
  CGO_ENABLED=0 GOBIN="$NODE_DIR" go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION"
  echo "$GRPCURL_VERSION" > "$NODE_DIR/.grpcurl.version"
}

install_etcd() {
  up_to_date etcd "$ETCD_VERSION" && return 0
  echo "install-k8s: building etcd $ETCD_VERSION from the Go module proxy" >&2
  local tmp
  tmp="$(module_copy "go.etcd.io/etcd/server/v3@$ETCD_VERSION")"
  (
    cd "$tmp/src"
    sed -i -E "s#^(\s*go\.etcd\.io/etcd/[a-z0-9/]+/v3) => \.\./[a-z0-9/]+\$#\1 => \1 $ETCD_VERSION#" go.mod
    GOFLAGS="$GOFLAGS -mod=mod" go build -ldflags "-s -w" -o "$tmp/etcd" .
  )
  mv "$tmp/etcd" "$BIN_DIR/etcd"
  echo "$ETCD_VERSION" > "$BIN_DIR/.etcd.version"
  rm -rf "$tmp"
}

install_kwok() {
  if up_to_date kwok "$KWOK_VERSION" && [[ -f "$STAGE_DIR/.version" && "$(cat "$STAGE_DIR/.version")" == "$KWOK_VERSION" ]]; then
    return 0
  fi
  echo "install-k8s: building kwok $KWOK_VERSION from the Go module proxy" >&2
  local tmp
  tmp="$(module_copy "sigs.k8s.io/kwok@$KWOK_VERSION")"
  (cd "$tmp/src" && GOFLAGS="$GOFLAGS -mod=mod" go build -ldflags "-s -w" -o "$tmp/kwok" ./cmd/kwok)
  # The stages kwok's own cluster setup uses: nodes become Ready at once and
  # keep a heartbeat; pods go through the usual lifecycle (Running, Ready,
  # deleted when asked).
  rm -rf "$STAGE_DIR"
  mkdir -p "$STAGE_DIR"
  cp "$tmp/src/kustomize/stage/node/fast/"*.yaml "$STAGE_DIR/"
  cp "$tmp/src/kustomize/stage/node/heartbeat/"*.yaml "$STAGE_DIR/"
  cp "$tmp/src/kustomize/stage/pod/general/"*.yaml "$STAGE_DIR/"
  rm -f "$STAGE_DIR/kustomization.yaml"
  mv "$tmp/kwok" "$BIN_DIR/kwok"
  echo "$KWOK_VERSION" > "$BIN_DIR/.kwok.version"
  echo "$KWOK_VERSION" > "$STAGE_DIR/.version"
  rm -rf "$tmp"
}

install_etcd
install_kwok
install_kubernetes
install_coredns
install_static_grpcurl
echo "$BIN_DIR"
