#!/usr/bin/env bash
# The side-by-side benchmark, with throwaway PostgreSQL, MariaDB and Galera servers:
#   bash scripts/bench.sh [--quick] [--rounds N] [--only sqlite,server,coherence,shared,slices,galera]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/servers.sh
. scripts/galera.sh
start_servers
trap 'stop_galera; stop_servers' EXIT
start_galera
cargo run --release -p wth-bench -- "$@"
