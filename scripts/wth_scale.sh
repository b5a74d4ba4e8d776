#!/usr/bin/env bash
# `wth` at table scale against the databases' own tools, side by side: a table of
# 1,000,000 rows (~55-byte JSON values) on SQLite, copied to PostgreSQL and MariaDB
# (started as scripts/test.sh does). Prints wall time and peak memory of each command.
#   bash scripts/wth_scale.sh [ROWS]
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-1000000}
. scripts/servers.sh
start_servers >/dev/null
dir=$(mktemp -d)
trap 'stop_servers; rm -rf "$dir"' EXIT
cargo build --release -q -p wth
wth=$PWD/target/release/wth
cd "$dir"
python3 - "$rows" <<'PY'
import json, sys
with open('rows.jsonl', 'w') as f:
    for i in range(int(sys.argv[1])):
        f.write(json.dumps({'key': 'user:%07d' % i, 'value': {'name': 'n%d' % i, 'age': i % 90,
                'tags': ['a', 'b'], 'ok': True}}, separators=(',', ':')) + '\n')
PY
t() { local what=$1; shift; /usr/bin/time -f "$what: %e s, %M KB" "$@"; }
t "wth load (SQLite, new table)" "$wth" --db sqlite:big.db load rows.jsonl
t "wth get" "$wth" --db sqlite:big.db get '"user:0500000"' >/dev/null
t "wth set" "$wth" --db sqlite:big.db set '"user:0500000"' '{"x":1}'
t "wth rm" "$wth" --db sqlite:big.db rm '"user:0500000"'
t "wth count" "$wth" --db sqlite:big.db count >/dev/null
t "sqlite3 count" sqlite3 big.db 'SELECT count(*) FROM hashtable' >/dev/null
t "wth dump" sh -c "'$wth' --db sqlite:big.db dump > wth.jsonl"
t "sqlite3 writing the same JSON lines" sh -c "sqlite3 big.db \"SELECT json_object('key', json(key), 'value', json(value)) FROM hashtable ORDER BY key\" > sqlite3.jsonl"
cmp wth.jsonl sqlite3.jsonl && echo "the two dumps are the same bytes"
t "wth dump | head -3" sh -c "'$wth' --db sqlite:big.db dump | head -3 >/dev/null"
psql "$WTH_POSTGRES_URL" -qc 'CREATE TABLE native (key text COLLATE "C" NOT NULL PRIMARY KEY, value text NOT NULL)'
for round in 1 2; do
  t "wth copy SQLite -> PostgreSQL (round $round)" "$wth" --db sqlite:big.db copy --to "$WTH_POSTGRES_URL"
  psql "$WTH_POSTGRES_URL" -qc 'TRUNCATE native'
  t "sqlite3 -csv | psql \\copy (round $round)" sh -c "sqlite3 -csv big.db 'SELECT key, value FROM hashtable' | psql '$WTH_POSTGRES_URL' -qc '\\copy native(key, value) from stdin csv'"
done
t "wth copy SQLite -> MariaDB" "$wth" --db sqlite:big.db copy --to "$WTH_MYSQL_URL"
t "wth load into PostgreSQL (upsert over the rows)" "$wth" --db "$WTH_POSTGRES_URL" load rows.jsonl
t "wth get (PostgreSQL)" "$wth" --db "$WTH_POSTGRES_URL" get '"user:0123456"' >/dev/null
t "wth count (PostgreSQL)" "$wth" --db "$WTH_POSTGRES_URL" count >/dev/null
t "psql count" psql "$WTH_POSTGRES_URL" -Atc 'SELECT count(*) FROM hashtable' >/dev/null
