#!/usr/bin/env bash
# The whole test suite, on every backend, from a fresh machine:
#   bash scripts/test.sh
# - installs PostgreSQL 15 and MariaDB from Debian's packages when they are missing
#   (as root), starts both on 127.0.0.1 in temporary directories, and stops them at exit;
#   and a PostgreSQL hot standby of the first (pg_basebackup -R) for tests/standby.rs,
#   and a 3-node MariaDB Galera cluster (scripts/galera.sh) for tests/galera.rs;
#   and a 3-node PostgreSQL cluster that Patroni fails over, with pgbouncer in front
#   (scripts/pg_ha.sh), for tests/pg_ha.rs and the conformance suite through pgbouncer;
# - or uses the servers that WTH_POSTGRES_URL, WTH_POSTGRES_STANDBY_URL and
#   WTH_MYSQL_URL point to;
# - installs unixODBC and the psqlODBC, MariaDB and SQLite ODBC drivers, and runs the
#   conformance suite over ODBC too;
# - runs every test of every feature against them and prints how many ran per backend.
# A backend whose server cannot be started or reached fails the run: nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/servers.sh
. scripts/galera.sh
. scripts/pg_ha.sh

start_servers
trap 'stop_pg_ha; stop_galera; stop_servers' EXIT
# Unless the caller points at clusters of its own.
if [ -z "${WTH_GALERA_URL_1:-}" ]; then
  start_galera
fi
if [ -z "${WTH_PG_HA_URL:-}" ]; then
  start_pg_ha
fi

log=$(mktemp)
status=0
cargo test --all-features --workspace 2>&1 | tee "$log" || status=$?

echo
echo "tests run per backend (conformance and backend-specific):"
for backend in sqlite postgres mysql odbc_sqlite odbc_postgres odbc_mysql galera pgbouncer pg_ha; do
  # A test belongs to a backend by a path segment (`mysql::…`) or a name prefix (`mysql_…`).
  pattern="^test ([a-z0-9_]+::)*${backend}(::|_)[a-z0-9_:]*"
  passed=$(grep -cE "$pattern \.\.\. ok$" "$log" || true)
  failed=$(grep -cE "$pattern \.\.\. FAILED$" "$log" || true)
  printf '  %-14s %3d passed, %d failed\n' "$backend" "$passed" "$failed"
  if [ "$passed" -eq 0 ]; then echo "  no $backend test ran: that is a failure" >&2; status=1; fi
done
grep -E "^test result:" "$log" | awk '{p+=$4; f+=$6} END {printf "all test binaries: %d passed, %d failed\n", p, f}'
rm -f "$log"
exit $status
