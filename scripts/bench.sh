#!/usr/bin/env bash
# The side-by-side benchmark, with throwaway PostgreSQL and MariaDB servers:
#   bash scripts/bench.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/servers.sh
start_servers
trap stop_servers EXIT
cargo run --release -p wth-bench -- "$@"
