#!/usr/bin/env bash
# Installs what ringcache is compared with: Debian's redis-server,
# redis-tools (redis-benchmark) and nutcracker (twemproxy). Idempotent. The
# packages' own services are not started: the benchmark starts its servers
# on free ports itself.
set -euo pipefail
if command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null && command -v nutcracker >/dev/null; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "install-peers: run as root, or install redis-server redis-tools nutcracker yourself" >&2
  exit 1
fi
echo "install-peers: installing redis-server redis-tools nutcracker from Debian" >&2
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
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server redis-tools nutcracker >/dev/null
