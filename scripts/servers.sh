# Sourced by scripts/test.sh (and usable by hand: `. scripts/servers.sh; start_servers`).
# Starts throwaway PostgreSQL and MariaDB servers on 127.0.0.1, and a hot standby of the
# PostgreSQL one, and exports WTH_POSTGRES_URL, WTH_POSTGRES_STANDBY_URL and
# WTH_MYSQL_URL, unless they are set already; writes a private
# unixODBC driver list (ODBCSYSINI) and exports WTH_ODBC_POSTGRES, WTH_ODBC_MYSQL and
# WTH_ODBC_SQLITE, ODBC connection strings for the same servers and for SQLite files.

WTH_SERVER_DIR=""
PG_BIN=/usr/lib/postgresql/15/bin

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

ODBC_PACKAGES=(unixodbc unixodbc-dev odbc-postgresql odbc-mariadb libsqliteodbc)

install_packages() {
  local missing=() p
  [ -x "$PG_BIN/initdb" ] || missing+=(postgresql-15)
  command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server)
  for p in "${ODBC_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing ${missing[*]}: run as root to install them" >&2
    return 1
  fi
  echo "installing ${missing[*]} ..."
  export DEBIAN_FRONTEND=noninteractive
  # Keep the packages from starting servers of their own on the default ports.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
}

# Runs a command as the given system user when we are root, else as ourselves.
as_user() {
  local user=$1; shift
  if [ "$(id -u)" -eq 0 ]; then runuser -u "$user" -- "$@"; else "$@"; fi
}

start_postgres() {
  local dir=$WTH_SERVER_DIR/pg port
  port=$(free_port)
  mkdir -p "$dir"
  [ "$(id -u)" -eq 0 ] && chown postgres "$dir"
  echo wth-secret > "$dir.pw" && chmod 644 "$dir.pw"
  as_user postgres "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=scram-sha-256 \
    --pwfile="$dir.pw" -E UTF8 --locale=C.UTF-8 >"$dir.log" 2>&1 \
    || { cat "$dir.log" >&2; return 1; }
  as_user postgres "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=200 -c fsync=off" >/dev/null \
    || { cat "$dir/server.log" >&2; return 1; }
  export WTH_POSTGRES_URL="postgres://postgres:wth-secret@127.0.0.1:$port/postgres"
  WTH_PG_PORT=$port
  echo "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$port"
}

# A hot standby of the PostgreSQL server started above, by streaming replication
# (pg_basebackup -R), on a port of its own: exports WTH_POSTGRES_STANDBY_URL.
start_postgres_standby() {
  local dir=$WTH_SERVER_DIR/pgstandby port
  port=$(free_port)
  mkdir -p "$dir"
  [ "$(id -u)" -eq 0 ] && chown postgres "$dir"
  as_user postgres env PGPASSWORD=wth-secret "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$WTH_PG_PORT" \
    -U postgres -D "$dir/data" -R -X stream >"$dir.log" 2>&1 || { cat "$dir.log" >&2; return 1; }
  as_user postgres "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c hot_standby=on -c max_connections=200 -c fsync=off" >/dev/null \
    || { cat "$dir/server.log" >&2; return 1; }
  export WTH_POSTGRES_STANDBY_URL="postgres://postgres:wth-secret@127.0.0.1:$port/postgres"
  echo "PostgreSQL hot standby on 127.0.0.1:$port"
}

start_mariadb() {
  local dir=$WTH_SERVER_DIR/my port mariadbd
  port=$(free_port)
  mariadbd=$(command -v mariadbd || echo /usr/sbin/mariadbd)
  mkdir -p "$dir/data"
  [ "$(id -u)" -eq 0 ] && chown -R mysql "$dir"
  mariadb-install-db --no-defaults --datadir="$dir/data" --user="$(id -un | sed 's/^root$/mysql/')" \
    --auth-root-authentication-method=socket >"$dir.log" 2>&1 || { cat "$dir.log" >&2; return 1; }
  setsid "$mariadbd" --no-defaults --user=mysql --datadir="$dir/data" --bind-address=127.0.0.1 \
    --port="$port" --socket="$dir/sock" --pid-file="$dir/pid" --max-connections=300 \
    --innodb-flush-log-at-trx-commit=2 --log-error="$dir/server.log" >/dev/null 2>&1 < /dev/null &
  for _ in $(seq 1 120); do
    mariadb-admin --no-defaults --socket="$dir/sock" -uroot ping >/dev/null 2>&1 && break
    sleep 0.5
  done
  mariadb --no-defaults --socket="$dir/sock" -uroot -e \
    "DELETE FROM mysql.global_priv WHERE User = ''; FLUSH PRIVILEGES;
     CREATE USER 'wth'@'%' IDENTIFIED BY 'wth-secret'; GRANT ALL ON *.* TO 'wth'@'%' WITH GRANT OPTION;" \
    || { cat "$dir/server.log" >&2; return 1; }
  export WTH_MYSQL_URL="mysql://wth:wth-secret@127.0.0.1:$port/mysql"
  WTH_MY_PORT=$port
  echo "MariaDB $("$mariadbd" --version | awk '{print $3}') on 127.0.0.1:$port"
}

# The path of a driver library that a Debian package installs.
driver_path() {
  dpkg -L "$1" 2>/dev/null | grep -m1 "/$2\$"
}

setup_odbc() {
  local dir=$WTH_SERVER_DIR/odbc pg my lite
  pg=$(driver_path odbc-postgresql psqlodbcw.so)
  my=$(driver_path odbc-mariadb libmaodbc.so)
  lite=$(driver_path libsqliteodbc libsqlite3odbc.so)
  if [ -z "$pg" ] || [ -z "$my" ] || [ -z "$lite" ]; then
    echo "an ODBC driver is missing (psqlODBC: '$pg', MariaDB: '$my', SQLite: '$lite')" >&2
    return 1
  fi
  mkdir -p "$dir"
  printf '[WTH PostgreSQL]\nDriver=%s\n\n[WTH MariaDB]\nDriver=%s\n\n[WTH SQLite3]\nDriver=%s\n' \
    "$pg" "$my" "$lite" > "$dir/odbcinst.ini"
  : > "$dir/odbc.ini"
  export ODBCSYSINI=$dir
  if [ -n "${WTH_PG_PORT:-}" ]; then
    # A DSN too, as users set them up: tests/odbc_dsn.rs opens a map through it.
    printf '[wth_postgres]\nDriver=WTH PostgreSQL\nServername=127.0.0.1\nPort=%s\nDatabase=postgres\n' \
      "$WTH_PG_PORT" > "$dir/odbc.ini"
    export WTH_ODBC_DSN="${WTH_ODBC_DSN:-DSN=wth_postgres;Uid=postgres;Pwd=wth-secret;}"
  fi
  if [ -n "${WTH_PG_PORT:-}" ] && [ -z "${WTH_ODBC_POSTGRES:-}" ]; then
    export WTH_ODBC_POSTGRES="Driver={WTH PostgreSQL};Server=127.0.0.1;Port=$WTH_PG_PORT;Database=postgres;Uid=postgres;Pwd=wth-secret;"
  fi
  if [ -n "${WTH_MY_PORT:-}" ] && [ -z "${WTH_ODBC_MYSQL:-}" ]; then
    export WTH_ODBC_MYSQL="Driver={WTH MariaDB};Server=127.0.0.1;Port=$WTH_MY_PORT;Database=mysql;Uid=wth;Pwd=wth-secret;CHARSET=utf8mb4;"
  fi
  if [ -z "${WTH_ODBC_SQLITE:-}" ]; then
    export WTH_ODBC_SQLITE='Driver={WTH SQLite3};'
  fi
  echo "ODBC drivers: $(dpkg-query -W -f='${Package} ${Version}, ' odbc-postgresql odbc-mariadb libsqliteodbc unixodbc)"
}

start_servers() {
  install_packages
  WTH_SERVER_DIR=$(mktemp -d /tmp/wth-servers.XXXXXX)
  chmod 755 "$WTH_SERVER_DIR"
  if [ -z "${WTH_POSTGRES_URL:-}" ]; then
    start_postgres
    [ -n "${WTH_POSTGRES_STANDBY_URL:-}" ] || start_postgres_standby
  fi
  [ -n "${WTH_MYSQL_URL:-}" ] || start_mariadb
  setup_odbc
}

stop_servers() {
  [ -n "$WTH_SERVER_DIR" ] || return 0
  if [ -d "$WTH_SERVER_DIR/pgstandby/data" ]; then
    as_user postgres "$PG_BIN/pg_ctl" -D "$WTH_SERVER_DIR/pgstandby/data" -m immediate stop >/dev/null 2>&1 || true
  fi
  if [ -d "$WTH_SERVER_DIR/pg/data" ]; then
    as_user postgres "$PG_BIN/pg_ctl" -D "$WTH_SERVER_DIR/pg/data" -m immediate stop >/dev/null 2>&1 || true
  fi
  if [ -f "$WTH_SERVER_DIR/my/pid" ]; then
    kill "$(cat "$WTH_SERVER_DIR/my/pid")" 2>/dev/null || true
    sleep 1
  fi
  rm -rf "$WTH_SERVER_DIR"
}
