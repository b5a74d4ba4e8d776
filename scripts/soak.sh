#!/usr/bin/env bash
# The long soak of tests/heal.rs: threads writing through shared and plain maps, a
# plain-SQL writer, while a proxy cuts every connection at random, on PostgreSQL and
# MariaDB (started as scripts/test.sh does). CI runs the same test for 4 s.
#   bash scripts/soak.sh [SECONDS]      (default 600)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/servers.sh
start_servers
trap stop_servers EXIT
WTH_SOAK_SECS=${1:-600} cargo test --release --all-features --test heal soak -- --nocapture --test-threads 1
