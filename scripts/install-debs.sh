#!/usr/bin/env bash
# Installs Debian packages the tests and benchmarks drive, by group.
# Idempotent: nothing is installed when every command of the group is
# already there. The packages' own services are not started.
#
#   scripts/install-debs.sh peers   # what ringcache is compared with:
#                                   # redis-server, redis-benchmark, twemproxy
#   scripts/install-debs.sh image   # building and running the container
#                                   # image without a Docker daemon: umoci,
#                                   # skopeo, podman (with runc)
#   scripts/install-debs.sh node    # a real Kubernetes node: containerd,
#                                   # CNI plugins, busybox (test image), gcc
set -euo pipefail

group="${1:-peers}"
case "$group" in
  peers)
    commands=(redis-server redis-benchmark nutcracker)
    packages=(redis-server redis-tools nutcracker)
    apt_flags=(--no-install-recommends)
    ;;
  image)
    commands=(umoci skopeo podman runc)
    packages=(umoci skopeo podman runc)
    # podman's recommended packages are its usual runtime pieces (network
    # backend, storage helpers, init): take them.
    apt_flags=()
    ;;
  node)
    commands=(containerd ctr /usr/lib/cni/bridge busybox iptables gcc)
    packages=(containerd containernetworking-plugins busybox-static iptables gcc libc6-dev)
    apt_flags=(--no-install-recommends)
    ;;
  *) echo "install-debs: unknown group '$group' (peers, image, node)" >&2; exit 2 ;;
esac

missing=0
for c in "${commands[@]}"; do
  command -v "$c" >/dev/null || missing=1
done
[[ $missing -eq 0 ]] && exit 0

if [[ $(id -u) -ne 0 ]]; then
  echo "install-debs: run as root, or install ${packages[*]} yourself" >&2
  exit 1
fi
echo "install-debs: installing ${packages[*]} from Debian" >&2
# Keep the packages from starting their services.
policy=/usr/sbin/policy-rc.d
had_policy=0
[[ -e $policy ]] && had_policy=1
if [[ $had_policy -eq 0 ]]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
fi
trap '[[ $had_policy -eq 0 ]] && rm -f "$policy"' EXIT
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_flags[@]}" "${packages[@]}" >/dev/null
