# shellcheck shell=bash
# shellcheck disable=SC2015,SC2016
# A 3-node Patroni-managed PostgreSQL 15 cluster with synchronous replication, a
# single-node etcd as its DCS and a pgbouncer (transaction pooling) that follows the
# primary, all on 127.0.0.1 on free ports, for the failover tests. Sourced by
# scripts/test.sh (after scripts/servers.sh) or by hand: `. scripts/pg_ha.sh; start_pg_ha`.
#   start_pg_ha       installs patroni, etcd-server, pgbouncer (and postgresql-15) when
#                     missing, starts etcd, three Patroni nodes and pgbouncer, waits for a
#                     primary with two streaming standbys (one synchronous), and exports
#                     WTH_PG_HA_URL (all three nodes, target_session_attrs=read-write),
#                     WTH_PGBOUNCER_URL and WTH_PG_HA_DIR
#   kill_pg_primary   SIGKILLs the current primary's Patroni and its postgres processes
#                     (node loss); records the node in $WTH_PG_HA_DIR/killed
#   revive_pg_nodes   starts Patroni again on the killed nodes (they rejoin as standbys,
#                     by pg_rewind) and waits until the cluster has a primary, two
#                     streaming standbys and a synchronous one again
#   stop_pg_ha        stops everything and removes the directory; safe to call twice
# User postgres, password wth-secret (scram-sha-256); replication user replicator.
# Runs as root (postgres, Patroni, etcd and pgbouncer run as the postgres OS user) or
# as the postgres user itself.

WTH_PG_HA_DIR=${WTH_PG_HA_DIR:-}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
# Failover timing: the leader key lives ttl seconds after the primary's Patroni is
# gone; the standbys look every loop_wait seconds. ttl >= loop_wait + 2 * retry_timeout.
: "${WTH_PG_HA_TTL:=10}"
: "${WTH_PG_HA_LOOP_WAIT:=1}"
: "${WTH_PG_HA_RETRY_TIMEOUT:=4}"
: "${WTH_PG_HA_TIMEOUT:=120}"
WTH_PG_HA_PASS=wth-secret

declare -F free_port >/dev/null || free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

declare -F as_user >/dev/null || as_user() {
  local user=$1; shift
  if [ "$(id -u)" -eq 0 ]; then runuser -u "$user" -- "$@"; else "$@"; fi
}

_ha_now() { date +%s.%N; }
_ha_log() { echo "[pg_ha $(date +%T.%3N)] $*" >&2; }
_ha_elapsed() { awk -v a="$1" -v b="$(_ha_now)" 'BEGIN{printf "%.1fs", b-a}'; }

# alive = exists and not a zombie (the nodes are not our children)
_ha_alive() {
  local st
  [ -n "${1:-}" ] && st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [ -n "$st" ] && [ "$st" != Z ]
}

# ours = alive and its command line names our directory (a pid file of a process that
# died long ago may name a pid now reused by something else)
_ha_ours() {
  _ha_alive "${1:-}" && { tr '\0' ' ' < "/proc/$1/cmdline"; } 2>/dev/null | grep -qF "$WTH_PG_HA_DIR/"
}

# _ha_new_port VAR: sets VAR to a free port that no other port of this cluster uses
# (not $(...): the list of ports taken must survive the call)
_ha_new_port() {
  local _hp
  while :; do
    _hp=$(free_port) || return 1
    case " ${_HA_USED_PORTS:-} " in *" $_hp "*) continue ;; esac
    _HA_USED_PORTS="${_HA_USED_PORTS:-} $_hp"
    printf -v "$1" '%s' "$_hp"
    return 0
  done
}

_ha_install_packages() {
  local missing=() own_policy=0
  [ -x "$PG_BIN/initdb" ] || missing+=(postgresql-15)
  command -v patroni >/dev/null 2>&1 || missing+=(patroni)
  dpkg -s python3-etcd >/dev/null 2>&1 || missing+=(python3-etcd)
  command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
  command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
  command -v psql >/dev/null 2>&1 || missing+=(postgresql-client-15)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    _ha_log "missing ${missing[*]}: run as root to install them"
    return 1
  fi
  _ha_log "installing ${missing[*]} ..."
  export DEBIAN_FRONTEND=noninteractive
  # Keep the packages from starting daemons of their own (etcd on 2379, pgbouncer on 6432).
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own_policy=1
  fi
  apt-get update -qq || true
  if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
    [ $own_policy -eq 1 ] && rm -f /usr/sbin/policy-rc.d
    _ha_log "apt-get install ${missing[*]} failed"
    return 1
  fi
  [ $own_policy -eq 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

# _ha_spawn PIDFILE LOGFILE CMD...: CMD as user postgres in a session of its own, not a
# child of this shell (a bare `wait` in the test script would block on it); PIDFILE
# gets the pid of CMD itself (exec), not of runuser.
_ha_spawn() {
  local pidfile=$1 log=$2 i
  shift 2
  rm -f "$pidfile"
  if [ "$(id -u)" -eq 0 ]; then
    ( setsid runuser -u postgres -- sh -c 'echo $$ > "$0"; exec "$@"' "$pidfile" "$@" \
        </dev/null >>"$log" 2>&1 & )
  else
    ( setsid sh -c 'echo $$ > "$0"; exec "$@"' "$pidfile" "$@" </dev/null >>"$log" 2>&1 & )
  fi
  for i in $(seq 1 100); do
    if [ -s "$pidfile" ]; then
      # its session (setsid): the children Patroni runs (initdb, pg_basebackup,
      # pg_rewind, callbacks) stay in it; postgres itself gets a session of its own
      awk '{print $6}' "/proc/$(cat "$pidfile")/stat" > "${pidfile%.pid}.sid" 2>/dev/null || true
      return 0
    fi
    sleep 0.05
  done
  _ha_log "no pid file $pidfile"
  return 1
}

# _ha_session_pids SIDFILE: the processes of the session started by _ha_spawn, if its
# leader (runuser or sh, whose command line names our directory) is still there.
_ha_session_pids() {
  local sid
  sid=$(cat "$1" 2>/dev/null) && [ -n "$sid" ] || return 0
  { tr '\0' ' ' < "/proc/$sid/cmdline"; } 2>/dev/null | grep -qF "$WTH_PG_HA_DIR/" || return 0
  ps -eo pid=,sid= | awk -v s="$sid" '$2 == s {print $1}'
}

_ha_psql() { # _ha_psql PORT [psql args...]: superuser on the node (or pgbouncer) at PORT
  local port=$1; shift
  PGPASSWORD=$WTH_PG_HA_PASS PGCONNECT_TIMEOUT=${PGCONNECT_TIMEOUT:-3} \
    psql -X -q -A -t -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"
}

# These print nothing (and still succeed) when there is no such file.
_ha_node_pg_port() { sed -n 1p "$WTH_PG_HA_DIR/node$1/ports" 2>/dev/null || true; }
_ha_node_api_port() { sed -n 2p "$WTH_PG_HA_DIR/node$1/ports" 2>/dev/null || true; }
_ha_patroni_pid() { cat "$WTH_PG_HA_DIR/node$1/patroni.pid" 2>/dev/null || true; }
_ha_postmaster_pid() { head -n1 "$WTH_PG_HA_DIR/node$1/data/postmaster.pid" 2>/dev/null || true; }

# The number of the node whose Patroni answers 200 on GET /primary, or nothing.
_ha_primary_node() {
  local n code
  for n in 1 2 3; do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 \
      "http://127.0.0.1:$(_ha_node_api_port "$n")/primary" 2>/dev/null) || true
    if [ "$code" = 200 ]; then echo "$n"; return 0; fi
  done
  return 1
}

# Succeeds when node N is primary and has two streaming standbys, one of them
# synchronous both for PostgreSQL (pg_stat_replication.sync_state) and for Patroni
# (its /sync key, GET /sync answers 200): Patroni promotes only the standby named there.
_ha_cluster_ok() { # _ha_cluster_ok N [MIN_STREAMING_STANDBYS, default 2]
  local n=$1 min=${2:-2} out streaming sync code
  out=$(PGCONNECT_TIMEOUT=1 _ha_psql "$(_ha_node_pg_port "$n")" -c \
    "SELECT count(*) || ' ' || coalesce(min(application_name) FILTER (WHERE sync_state = 'sync'), '-')
     FROM pg_stat_replication WHERE state = 'streaming' AND NOT pg_is_in_recovery()" 2>/dev/null) || return 1
  streaming=${out%% *} sync=${out##* }
  [ "$streaming" -ge "$min" ] 2>/dev/null || return 1
  case "$sync" in node[123]) ;; *) return 1 ;; esac
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 \
    "http://127.0.0.1:$(_ha_node_api_port "${sync#node}")/sync" 2>/dev/null) || true
  [ "$code" = 200 ]
}

# Waits until there is a primary with two streaming standbys, one synchronous; prints
# the primary's node number.
_ha_wait_cluster() {
  local deadline=$(( SECONDS + WTH_PG_HA_TIMEOUT )) n=''
  while [ $SECONDS -lt $deadline ]; do
    n=$(_ha_primary_node) || n=''
    if [ -n "$n" ] && _ha_cluster_ok "$n"; then echo "$n"; return 0; fi
    sleep 0.3
  done
  _ha_log "timeout: no primary with two streaming standbys (one sync); primary node: '${n:-none}'"
  for n in 1 2 3; do
    _ha_log "tail of node$n/patroni.log:"
    tail -n 15 "$WTH_PG_HA_DIR/node$n/patroni.log" >&2 2>/dev/null || true
  done
  return 1
}

_ha_write_node() { # _ha_write_node N PG_PORT API_PORT ETCD_CLIENT_PORT
  local n=$1 pg=$2 api=$3 etcd=$4 d="$WTH_PG_HA_DIR/node$1"
  mkdir -p "$d"
  printf '%s\n%s\n' "$pg" "$api" > "$d/ports"
  cat > "$d/patroni.yml" <<EOF
scope: wth
namespace: /wth-pg-ha/
name: node$n
log:
  level: INFO
restapi:
  listen: 127.0.0.1:$api
  connect_address: 127.0.0.1:$api
etcd3:
  hosts: 127.0.0.1:$etcd
bootstrap:
  dcs:
    ttl: $WTH_PG_HA_TTL
    loop_wait: $WTH_PG_HA_LOOP_WAIT
    retry_timeout: $WTH_PG_HA_RETRY_TIMEOUT
    maximum_lag_on_failover: 1048576
    # A commit returns only once one standby has flushed it, and only that
    # synchronous standby may be promoted. Not strict: with no standby left, the
    # primary keeps accepting writes (availability over durability, a test cluster).
    synchronous_mode: true
    synchronous_mode_strict: false
    synchronous_node_count: 1
    postgresql:
      use_pg_rewind: true
      use_slots: true
      remove_data_directory_on_rewind_failure: true
      remove_data_directory_on_diverged_timelines: true
      parameters:
        max_connections: 200
        wal_log_hints: 'on'
        wal_keep_size: 256MB
        # a throwaway test cluster: no fsync (an OS crash could corrupt it, a process
        # kill cannot)
        fsync: 'off'
        full_page_writes: 'on'
        synchronous_commit: 'on'
        hot_standby: 'on'
        wal_receiver_status_interval: 1s
        wal_sender_timeout: 10s
        wal_receiver_timeout: 10s
        # the standby left after a failover retries its WAL source every 5 s by
        # default: it would stream from the new primary (and become its synchronous
        # standby) only ~5 s after the promotion
        wal_retrieve_retry_interval: 500ms
  initdb:
  - encoding: UTF8
  - locale: C.UTF-8
  - auth: scram-sha-256
  pg_hba:
  - local all all scram-sha-256
  - host all all 127.0.0.1/32 scram-sha-256
  - local replication replicator scram-sha-256
  - host replication replicator 127.0.0.1/32 scram-sha-256
postgresql:
  listen: 127.0.0.1:$pg
  connect_address: 127.0.0.1:$pg
  data_dir: $d/data
  bin_dir: $PG_BIN
  pgpass: $d/pgpass
  authentication:
    superuser:
      username: postgres
      password: '$WTH_PG_HA_PASS'
    replication:
      username: replicator
      password: '$WTH_PG_HA_PASS'
    rewind:
      username: postgres
      password: '$WTH_PG_HA_PASS'
  parameters:
    unix_socket_directories: '$d'
    password_encryption: scram-sha-256
  basebackup:
  - checkpoint: fast
  callbacks:
    on_start: $WTH_PG_HA_DIR/on_role_change.sh $pg
    on_role_change: $WTH_PG_HA_DIR/on_role_change.sh $pg
watchdog:
  mode: 'off'
tags:
  nofailover: false
  noloadbalance: false
  clonefrom: false
  nosync: false
EOF
}

# The pgbouncer configuration template (@PRIMARY_PORT@ is filled in by the callback),
# and the callback Patroni calls with: PG_PORT ACTION ROLE SCOPE.
_ha_write_pgbouncer() { # _ha_write_pgbouncer PGBOUNCER_PORT
  local port=$1 d="$WTH_PG_HA_DIR/pgbouncer"
  mkdir -p "$d"
  cat > "$d/pgbouncer.ini.in" <<EOF
[databases]
* = host=127.0.0.1 port=@PRIMARY_PORT@

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir = $d
pidfile = $d/pgbouncer.pid
logfile = $d/pgbouncer.log
auth_type = scram-sha-256
auth_file = $d/userlist.txt
; roles made after the start (tests make some) are looked up on the server
auth_user = postgres
admin_users = postgres
pool_mode = transaction
default_pool_size = 2
max_client_conn = 500
ignore_startup_parameters = extra_float_digits
; after a failover: retry a refused server connection soon, not after 15 s
server_login_retry = 0.5
server_connect_timeout = 3
log_connections = 0
log_disconnections = 0
EOF
  cat > "$WTH_PG_HA_DIR/on_role_change.sh" <<EOF
#!/bin/sh
# Patroni callback: on_start / on_role_change, args PG_PORT ACTION ROLE SCOPE. When this
# node has become the primary, points pgbouncer at it and makes it reload.
port=\$1 action=\$2 role=\$3
d=$d
pgbouncer_port=$port
echo "\$(date +%T.%3N) \$action \$role port \$port" >> "$WTH_PG_HA_DIR/callbacks.log"
case "\$role" in master|primary|promoted) ;; *) exit 0 ;; esac
sed "s/@PRIMARY_PORT@/\$port/g" "\$d/pgbouncer.ini.in" > "\$d/pgbouncer.ini.tmp" &&
  mv -f "\$d/pgbouncer.ini.tmp" "\$d/pgbouncer.ini" && echo "\$port" > "\$d/primary_port"
[ -s "\$d/pgbouncer.pid" ] || exit 0
PGPASSWORD=$WTH_PG_HA_PASS PGCONNECT_TIMEOUT=3 psql -X -q -h 127.0.0.1 -p "\$pgbouncer_port" -U postgres \\
  -d pgbouncer -c RELOAD >> "$WTH_PG_HA_DIR/callbacks.log" 2>&1 &&
  echo "\$(date +%T.%3N) pgbouncer now on port \$port" >> "$WTH_PG_HA_DIR/callbacks.log"
EOF
  chmod 755 "$WTH_PG_HA_DIR/on_role_change.sh"
}

_ha_start_etcd() {
  local d="$WTH_PG_HA_DIR/etcd" client peer i
  _ha_new_port client && _ha_new_port peer || return 1
  mkdir -p "$d"
  [ "$(id -u)" -eq 0 ] && chown -R postgres "$d"
  printf '%s\n%s\n' "$client" "$peer" > "$d/ports"
  # v3 API only: Patroni's etcd3 module talks to etcd's gRPC gateway (JSON over HTTP)
  # with urllib3 itself, no python3-etcd3 needed; --enable-v2 is not needed.
  _ha_spawn "$d/etcd.pid" "$d/etcd.log" etcd --name wth --data-dir "$d/data" \
    --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "wth=http://127.0.0.1:$peer" --initial-cluster-state new \
    --initial-cluster-token "wth-$$-$client" --logger zap --log-level warn \
    --auto-compaction-mode revision --auto-compaction-retention 10000 || return 1
  for i in $(seq 1 100); do
    curl -s --max-time 1 "http://127.0.0.1:$client/health" 2>/dev/null | grep -q '"health":"true"' && {
      WTH_PG_HA_ETCD_PORT=$client
      echo "etcd $(etcd --version | awk 'NR==1{print $3}') on 127.0.0.1:$client"
      return 0
    }
    _ha_alive "$(cat "$d/etcd.pid" 2>/dev/null)" || break
    sleep 0.1
  done
  _ha_log "etcd did not start; tail of etcd.log:"
  tail -n 20 "$d/etcd.log" >&2 2>/dev/null || true
  return 1
}

_ha_start_patroni() { # _ha_start_patroni N
  local d="$WTH_PG_HA_DIR/node$1"
  _ha_spawn "$d/patroni.pid" "$d/patroni.log" patroni "$d/patroni.yml"
}

_ha_start_pgbouncer() { # _ha_start_pgbouncer PRIMARY_NODE
  local d="$WTH_PG_HA_DIR/pgbouncer" pg secret i
  pg=$(_ha_node_pg_port "$1")
  # SCRAM pass-through: pgbouncer 1.18 authenticates clients against the server's own
  # SCRAM secret and reuses the client's proof to log in to the server.
  secret=$(_ha_psql "$pg" -c "SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'") \
    || { _ha_log "cannot read the SCRAM secret"; return 1; }
  printf '"postgres" "%s"\n' "$secret" > "$d/userlist.txt"
  chmod 600 "$d/userlist.txt"
  sed "s/@PRIMARY_PORT@/$pg/g" "$d/pgbouncer.ini.in" > "$d/pgbouncer.ini"
  echo "$pg" > "$d/primary_port"
  [ "$(id -u)" -eq 0 ] && chown -R postgres "$d"
  as_user postgres pgbouncer -d -q "$d/pgbouncer.ini" >>"$d/pgbouncer.out" 2>&1 \
    || { _ha_log "pgbouncer did not start"; tail -n 20 "$d/pgbouncer.out" "$d/pgbouncer.log" >&2 2>/dev/null; return 1; }
  for i in $(seq 1 50); do
    [ "$(_ha_psql "$WTH_PG_HA_PGBOUNCER_PORT" -c 'SELECT 1' 2>/dev/null)" = 1 ] && {
      echo "pgbouncer $(pgbouncer --version | awk 'NR==1{print $2}') (transaction pooling) on 127.0.0.1:$WTH_PG_HA_PGBOUNCER_PORT"
      return 0
    }
    sleep 0.1
  done
  _ha_log "pgbouncer does not answer; tail of pgbouncer.log:"
  tail -n 20 "$d/pgbouncer.log" >&2 2>/dev/null || true
  return 1
}

start_pg_ha() {
  local t0 n ports=() hosts='' p api
  t0=$(_ha_now)
  if [ -n "$WTH_PG_HA_DIR" ] && [ -d "$WTH_PG_HA_DIR" ]; then
    _ha_log "already started in $WTH_PG_HA_DIR"
    return 1
  fi
  _ha_install_packages || return 1
  WTH_PG_HA_DIR=$(mktemp -d /tmp/wth-pg-ha.XXXXXX) || return 1
  export WTH_PG_HA_DIR
  chmod 755 "$WTH_PG_HA_DIR"
  _HA_USED_PORTS=''
  _ha_start_etcd || { stop_pg_ha; return 1; }
  _ha_new_port WTH_PG_HA_PGBOUNCER_PORT || { stop_pg_ha; return 1; }
  _ha_write_pgbouncer "$WTH_PG_HA_PGBOUNCER_PORT"
  for n in 1 2 3; do
    _ha_new_port p && _ha_new_port api && _ha_write_node "$n" "$p" "$api" "$WTH_PG_HA_ETCD_PORT" \
      || { stop_pg_ha; return 1; }
    ports+=("$p")
    hosts="${hosts:+$hosts,}127.0.0.1:$p"
  done
  : > "$WTH_PG_HA_DIR/killed"
  [ "$(id -u)" -eq 0 ] && chown -R postgres "$WTH_PG_HA_DIR"
  for n in 1 2 3; do
    _ha_start_patroni "$n" || { stop_pg_ha; return 1; }
  done
  n=$(_ha_wait_cluster) || { stop_pg_ha; return 1; }
  echo "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') x3 under Patroni $(patroni --version 2>/dev/null | awk '{print $2}') on 127.0.0.1:${ports[0]},${ports[1]},${ports[2]} (primary node$n, synchronous standby)"
  _ha_start_pgbouncer "$n" || { stop_pg_ha; return 1; }
  export WTH_PG_HA_URL="postgres://postgres:$WTH_PG_HA_PASS@$hosts/postgres?target_session_attrs=read-write"
  export WTH_PGBOUNCER_URL="postgres://postgres:$WTH_PG_HA_PASS@127.0.0.1:$WTH_PG_HA_PGBOUNCER_PORT/postgres"
  printf 'WTH_PG_HA_URL=%s\nWTH_PGBOUNCER_URL=%s\n' "$WTH_PG_HA_URL" "$WTH_PGBOUNCER_URL" > "$WTH_PG_HA_DIR/env"
  echo "PostgreSQL HA cluster up in $(_ha_elapsed "$t0") ($WTH_PG_HA_DIR)"
}

# SIGKILLs the primary's Patroni and postgres (postmaster and its children at once):
# the node is lost, so the leader key expires after ttl and the synchronous standby
# takes over. Records the node number in $WTH_PG_HA_DIR/killed for revive_pg_nodes.
kill_pg_primary() {
  local n ppid pmpid pids i
  [ -n "$WTH_PG_HA_DIR" ] && [ -d "$WTH_PG_HA_DIR" ] || { _ha_log "not started"; return 1; }
  for i in $(seq 1 50); do
    n=$(_ha_primary_node) && break
    sleep 0.2
  done
  [ -n "${n:-}" ] || { _ha_log "no primary to kill"; return 1; }
  # Patroni promotes only the standby its /sync key names: after a failover that takes
  # ~5 s; a kill before it would leave the cluster without a primary.
  for i in $(seq 1 $(( WTH_PG_HA_TIMEOUT * 5 ))); do
    _ha_cluster_ok "$n" 1 && break
    [ "$i" -eq 1 ] && _ha_log "waiting for node$n to have a synchronous standby ..."
    sleep 0.2
  done
  _ha_cluster_ok "$n" 1 || _ha_log "node$n has no synchronous standby: no failover will follow"
  ppid=$(_ha_patroni_pid "$n")
  pmpid=$(_ha_postmaster_pid "$n")
  pids="$(_ha_session_pids "$WTH_PG_HA_DIR/node$n/patroni.sid" | tr '\n' ' ' || true)"
  _ha_ours "$ppid" && pids="$pids $ppid"
  if _ha_ours "$pmpid"; then
    pids="$pids $pmpid $(pgrep -P "$pmpid" 2>/dev/null | tr '\n' ' ' || true)"
  fi
  # shellcheck disable=SC2086
  [ -n "${pids// /}" ] && kill -KILL $pids 2>/dev/null
  for i in $(seq 1 100); do
    _ha_alive "$ppid" || _ha_alive "$pmpid" || break
    sleep 0.05
  done
  echo "$n" >> "$WTH_PG_HA_DIR/killed"
  _ha_log "killed primary node$n (127.0.0.1:$(_ha_node_pg_port "$n"); patroni $ppid, postgres $pmpid) at $(date +%T.%3N)"
}

# Starts Patroni again on every node whose Patroni is not running (the killed ones):
# they rejoin as standbys (pg_rewind, or a new base backup); then waits until the
# cluster has a primary with two streaming standbys, one synchronous.
revive_pg_nodes() {
  local t0 n started=''
  [ -n "$WTH_PG_HA_DIR" ] && [ -d "$WTH_PG_HA_DIR" ] || { _ha_log "not started"; return 1; }
  t0=$(_ha_now)
  for n in 1 2 3; do
    _ha_alive "$(_ha_patroni_pid "$n")" && continue
    _ha_start_patroni "$n" || return 1
    started="$started node$n"
  done
  n=$(_ha_wait_cluster) || return 1
  : > "$WTH_PG_HA_DIR/killed"
  _ha_log "revived${started:- nothing}; primary node$n with 2 streaming standbys in $(_ha_elapsed "$t0")"
}

_ha_rm_shm() { # _ha_rm_shm POSTMASTER_PID_FILE: its segment, if no process is attached
  local key shmid
  read -r key shmid < <(sed -n 7p "$1" 2>/dev/null) 2>/dev/null || return 0
  [ -n "${shmid:-}" ] && [ -n "${key:-}" ] || return 0
  ipcs -m 2>/dev/null | awk -v k="$(printf '0x%08x' "$key" 2>/dev/null)" -v id="$shmid" \
    '$1 == k && $2 == id && $6 == 0 {f = 1} END {exit !f}' || return 0
  ipcrm -m "$shmid" 2>/dev/null || true
}

stop_pg_ha() {
  local d=${WTH_PG_HA_DIR:-} n pid pids='' pms='' i alive
  [ -n "$d" ] && [ -d "$d" ] || { WTH_PG_HA_DIR=''; return 0; }
  pid=$(cat "$d/pgbouncer/pgbouncer.pid" 2>/dev/null) && _ha_ours "$pid" && pids="$pids $pid"
  for n in 1 2 3; do
    pid=$(_ha_patroni_pid "$n") && _ha_ours "$pid" && pids="$pids $pid"
    # and what Patroni runs (an initdb, pg_basebackup or pg_rewind in progress)
    pids="$pids $(_ha_session_pids "$d/node$n/patroni.sid" | tr '\n' ' ' || true)"
  done
  # shellcheck disable=SC2086
  [ -n "${pids// /}" ] && kill -KILL $pids 2>/dev/null
  # postgres: SIGQUIT, what pg_ctl -m immediate sends (it removes its shared memory)
  for n in 1 2 3; do
    pid=$(_ha_postmaster_pid "$n") && _ha_ours "$pid" && kill -QUIT "$pid" 2>/dev/null && pms="$pms $pid"
  done
  pid=$(cat "$d/etcd/etcd.pid" 2>/dev/null) && _ha_ours "$pid" && kill -TERM "$pid" 2>/dev/null && pms="$pms $pid"
  for i in $(seq 1 100); do
    alive=0
    for pid in $pids $pms; do _ha_alive "$pid" && alive=1; done
    [ $alive -eq 0 ] && break
    sleep 0.1
  done
  for pid in $pms; do
    _ha_alive "$pid" && kill -KILL "$pid" $(pgrep -P "$pid" 2>/dev/null) 2>/dev/null
  done
  # a postmaster killed by kill_pg_primary and never started again leaves its small
  # System V segment behind (the next start on that data directory would remove it)
  for n in 1 2 3; do
    _ha_rm_shm "$d/node$n/data/postmaster.pid"
  done
  rm -rf "$d"
  WTH_PG_HA_DIR=''
  unset WTH_PG_HA_URL WTH_PGBOUNCER_URL
  _ha_log "stopped and removed $d"
  return 0
}
