#!/usr/bin/env bash
# ringcache against twemproxy + Redis, side by side on this machine:
# installs the peer (Debian's redis-server, redis-tools, nutcracker) if
# missing, builds in release and prints the table (see BENCHMARKS.md).
#
#   scripts/bench-compare.sh                  # full run, 10 s per case
#   scripts/bench-compare.sh --seconds 20     # longer cases
#   scripts/bench-compare.sh --smoke          # a few thousand requests
#
# Results are also written as JSON to bench-results/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-debs.sh peers
exec cargo bench --locked -p integration-tests --bench compare -- --bench "$@"
