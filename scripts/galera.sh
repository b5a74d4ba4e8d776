# shellcheck shell=bash
# A 3-node MariaDB Galera cluster on 127.0.0.1, for the scale-out tests
# (`scripts/test.sh` starts it beside the other servers). Source this file, then:
#   start_galera            installs mariadb-server, galera-4 and rsync when missing,
#                           bootstraps node 1, joins 2 and 3 (rsync state transfer),
#                           waits until all three are Synced, and exports
#                           WTH_GALERA_URL_1/2/3 (user `wth`, password `p/w?x`,
#                           database `wth`) and WTH_GALERA_DIR
#   kill_galera_node N      SIGKILL node N
#   restart_galera_node N   --wsrep-recover, then a start at the recovered position
#                           (incremental state transfer), and waits until Synced
#   stop_galera             SIGTERM nodes 3, 2, 1, waits, removes the directory
# Ports (override through the environment before start_galera):
#   SQL 13306-13308, group communication 14567-14569, IST 14601-14603, SST 14701-14703
# Runs as root: mariadbd runs as user mysql; the admin client is root over the socket.

: "${WTH_GALERA_SQL_BASE:=13306}"
: "${WTH_GALERA_GCOMM_BASE:=14567}"
: "${WTH_GALERA_IST_BASE:=14601}"
: "${WTH_GALERA_SST_BASE:=14701}"
: "${WTH_GALERA_TIMEOUT:=90}"
# Faster failure detection than the defaults (suspect 5s / inactive 15s): after a
# SIGKILL, writes on the survivors stall until the dead node is suspected.
: "${WTH_GALERA_EVS_OPTS=evs.keepalive_period=PT0.3S;evs.inactive_check_period=PT0.3S;evs.suspect_timeout=PT1.5S;evs.inactive_timeout=PT3S;evs.install_timeout=PT3S}"
WTH_GALERA_USER=wth
WTH_GALERA_PASS='p/w?x'
WTH_GALERA_PASS_ENC='p%2Fw%3Fx'
WTH_GALERA_DB=wth

_g_now() { date +%s.%N; }
_g_log() { echo "[galera $(date +%T.%3N)] $*" >&2; }
_g_elapsed() { awk -v a="$1" -v b="$(_g_now)" 'BEGIN{printf "%.2fs", b-a}'; }
_g_port() { echo $(( $1 + $2 - 1 )); }   # _g_port BASE N

# admin client for node N (root over the unix socket; unix_socket auth)
_g_sql() {
    local n=$1; shift
    mariadb --no-defaults -uroot -S "$WTH_GALERA_DIR/node$n/mysql.sock" -N -B "$@"
}

_g_status() { # _g_status N VARNAME
    { _g_sql "$1" -e "SHOW GLOBAL STATUS LIKE '$2'" 2>/dev/null || true; } | awk '{print $2}'
}

_g_pid() { cat "$WTH_GALERA_DIR/node$1/mariadbd.pid.run" 2>/dev/null; }

# alive = exists and not a zombie (nodes are not our children, see _g_launch)
_g_alive() {
    local st
    [[ -n ${1:-} ]] && st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [[ -n $st && $st != Z ]]
}

_g_write_cnf() {
    local n=$1 d="$WTH_GALERA_DIR/node$1"
    local sql gcomm ist sst
    sql=$(_g_port "$WTH_GALERA_SQL_BASE" "$n")
    gcomm=$(_g_port "$WTH_GALERA_GCOMM_BASE" "$n")
    ist=$(_g_port "$WTH_GALERA_IST_BASE" "$n")
    sst=$(_g_port "$WTH_GALERA_SST_BASE" "$n")
    local members="127.0.0.1:$WTH_GALERA_GCOMM_BASE,127.0.0.1:$(_g_port "$WTH_GALERA_GCOMM_BASE" 2),127.0.0.1:$(_g_port "$WTH_GALERA_GCOMM_BASE" 3)"
    mkdir -p "$d/data"
    cat > "$d/my.cnf" <<EOF
[mysqld]
user=mysql
datadir=$d/data
socket=$d/mysql.sock
pid-file=$d/mariadbd.pid
log-error=$d/error.log
tmpdir=$d/tmp
port=$sql
bind-address=127.0.0.1
skip-name-resolve
performance_schema=OFF
innodb_buffer_pool_size=64M
innodb_log_file_size=16M
innodb_flush_log_at_trx_commit=2
binlog_format=ROW
# Coherence installs triggers; with binary logging on, a user without SUPER may do so
# only with this set (otherwise error 1419).
log_bin_trust_function_creators=1
default_storage_engine=InnoDB
innodb_autoinc_lock_mode=2
wsrep_on=ON
wsrep_provider=/usr/lib/galera/libgalera_smm.so
wsrep_cluster_name=wth_test
wsrep_cluster_address=gcomm://$members
wsrep_node_name=node$n
wsrep_node_address=127.0.0.1
wsrep_node_incoming_address=127.0.0.1:$sql
wsrep_provider_options="gmcast.listen_addr=tcp://127.0.0.1:$gcomm;ist.recv_addr=127.0.0.1:$ist;gcache.size=32M${WTH_GALERA_EVS_OPTS:+;$WTH_GALERA_EVS_OPTS}"
wsrep_sst_method=rsync
wsrep_sst_receive_address=127.0.0.1:$sst
EOF
    mkdir -p "$d/tmp"
    chown -R mysql:mysql "$d"
}

# _g_launch N [extra mariadbd args...]
# Started from a subshell so mariadbd is NOT a child of the caller's shell: a bare
# `wait` in the test script would otherwise block forever on the nodes, and bash
# would print "Killed" job notices.
_g_launch() {
    local n=$1; shift
    local d="$WTH_GALERA_DIR/node$n"
    ( mariadbd --defaults-file="$d/my.cnf" "$@" </dev/null >>"$d/stdout.log" 2>&1 &
      echo $! > "$d/mariadbd.pid.run" )
}

# _g_wait_synced N [expected_cluster_size]
_g_wait_synced() {
    local n=$1 want=${2:-} deadline=$(( SECONDS + WTH_GALERA_TIMEOUT )) st='' sz='' pid
    pid=$(_g_pid "$n")
    while (( SECONDS < deadline )); do
        if ! _g_alive "$pid"; then
            _g_log "node$n (pid $pid) died; tail of error.log:"
            tail -n 30 "$WTH_GALERA_DIR/node$n/error.log" >&2
            return 1
        fi
        st=$(_g_status "$n" wsrep_local_state_comment)
        if [[ $st == Synced ]]; then
            [[ -z $want ]] && return 0
            sz=$(_g_status "$n" wsrep_cluster_size)
            [[ $sz == "$want" ]] && return 0
        fi
        sleep 0.2
    done
    _g_log "timeout waiting for node$n Synced (state='$st' size='$sz')"
    tail -n 30 "$WTH_GALERA_DIR/node$n/error.log" >&2
    return 1
}

_g_check_ports() {
    local p n busy=0
    for n in 1 2 3; do
        for p in "$(_g_port "$WTH_GALERA_SQL_BASE" $n)" "$(_g_port "$WTH_GALERA_GCOMM_BASE" $n)" \
                 "$(_g_port "$WTH_GALERA_IST_BASE" $n)" "$(_g_port "$WTH_GALERA_SST_BASE" $n)"; do
            if ss -Hltn "sport = :$p" | grep -q .; then _g_log "port $p already in use"; busy=1; fi
        done
    done
    return $busy
}

start_galera() {
    local t0 t n
    t0=$(_g_now)
    if [[ $EUID -ne 0 ]]; then _g_log "must run as root"; return 1; fi
    t=$(_g_now)
    if ! command -v mariadbd >/dev/null || [[ ! -e /usr/lib/galera/libgalera_smm.so ]] \
       || ! command -v rsync >/dev/null || ! command -v mariadb-install-db >/dev/null; then
        _g_log "installing mariadb-server galera-4 rsync"
        # policy-rc.d / no systemd: the packaged service is not started in containers;
        # if it is on a real host it only uses 3306 and does not interfere.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q mariadb-server galera-4 rsync >/dev/null \
          || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q mariadb-server galera-4 rsync >/dev/null; } \
          || { _g_log "apt-get install failed"; return 1; }
        _g_log "packages installed in $(_g_elapsed "$t")"
    fi
    _g_check_ports || return 1

    WTH_GALERA_DIR=$(mktemp -d /tmp/wth-galera.XXXXXX) || return 1
    export WTH_GALERA_DIR
    chmod 755 "$WTH_GALERA_DIR"          # mysql user must traverse it (mktemp gives 0700)
    for n in 1 2 3; do _g_write_cnf $n; done

    t=$(_g_now)
    mariadb-install-db --defaults-file="$WTH_GALERA_DIR/node1/my.cnf" --skip-test-db \
        >"$WTH_GALERA_DIR/node1/install-db.log" 2>&1 \
        || { _g_log "mariadb-install-db failed"; cat "$WTH_GALERA_DIR/node1/install-db.log" >&2; return 1; }
    _g_log "install-db: $(_g_elapsed "$t")"

    t=$(_g_now)
    _g_launch 1 --wsrep-new-cluster
    _g_wait_synced 1 || { stop_galera; return 1; }
    _g_log "node1 bootstrapped+Synced: $(_g_elapsed "$t")"

    # Create the app user on node 1 before joiners: CREATE USER/GRANT replicate (TOI),
    # and joiners get the mysql.* tables via SST anyway.
    t=$(_g_now)
    _g_sql 1 -e "
        DROP USER IF EXISTS ''@'localhost';
        CREATE DATABASE IF NOT EXISTS \`$WTH_GALERA_DB\`;
        CREATE USER IF NOT EXISTS '$WTH_GALERA_USER'@'%' IDENTIFIED BY '$WTH_GALERA_PASS';
        GRANT ALL PRIVILEGES ON \`$WTH_GALERA_DB\`.* TO '$WTH_GALERA_USER'@'%';" \
        || { _g_log "user creation failed"; stop_galera; return 1; }
    _g_log "user/db created: $(_g_elapsed "$t")"

    # Joiners one at a time (a donor serves one SST at a time anyway).
    for n in 2 3; do
        t=$(_g_now)
        _g_launch $n
        _g_wait_synced $n || { stop_galera; return 1; }
        _g_log "node$n joined (SST)+Synced: $(_g_elapsed "$t")"
    done
    for n in 1 2 3; do
        _g_wait_synced $n 3 || { stop_galera; return 1; }
    done
    for n in 1 2 3; do
        export "WTH_GALERA_URL_$n=mysql://$WTH_GALERA_USER:$WTH_GALERA_PASS_ENC@127.0.0.1:$(_g_port "$WTH_GALERA_SQL_BASE" $n)/$WTH_GALERA_DB"
    done
    _g_log "cluster up (size 3, all Synced) in $(_g_elapsed "$t0"), dir $WTH_GALERA_DIR"
}

kill_galera_node() {
    local n=$1 pid
    pid=$(_g_pid "$n")
    [[ -n $pid ]] || { _g_log "node$n: no pid"; return 1; }
    kill -KILL "$pid" 2>/dev/null
    while _g_alive "$pid"; do sleep 0.05; done
    _g_log "node$n (pid $pid) SIGKILLed"
}

restart_galera_node() {
    local n=$1 d="$WTH_GALERA_DIR/node$1" t t0 pos='' pid
    t0=$(_g_now)
    pid=$(_g_pid "$n")
    if _g_alive "$pid"; then _g_log "node$n still running"; return 1; fi
    rm -f "$d/mysql.sock" "$d/mysql.sock.lock" "$d/mariadbd.pid"
    t=$(_g_now)
    mariadbd --defaults-file="$d/my.cnf" --wsrep-recover --log-error="$d/recover.log" \
        </dev/null >>"$d/stdout.log" 2>&1 || true
    pos=$({ grep -o 'Recovered position: [^ ]*' "$d/recover.log" || true; } | tail -n1 | awk '{print $3}')
    cat "$d/recover.log" >> "$d/error.log" 2>/dev/null || true
    rm -f "$d/recover.log"
    if [[ -z $pos ]]; then _g_log "node$n: --wsrep-recover gave no position"; return 1; fi
    _g_log "node$n recovered position $pos in $(_g_elapsed "$t")"
    t=$(_g_now)
    _g_launch "$n" --wsrep-start-position="$pos"
    _g_wait_synced "$n" || return 1
    _g_log "node$n Synced (IST) in $(_g_elapsed "$t"); restart total $(_g_elapsed "$t0")"
}

stop_galera() {
    local n pid t0
    t0=$(_g_now)
    [[ -n ${WTH_GALERA_DIR:-} && -d $WTH_GALERA_DIR ]] || return 0
    for n in 3 2 1; do
        pid=$(_g_pid $n)
        _g_alive "$pid" || continue
        kill -TERM "$pid"
        local deadline=$(( SECONDS + 60 ))
        while _g_alive "$pid" && (( SECONDS < deadline )); do sleep 0.1; done
        if _g_alive "$pid"; then
            _g_log "node$n did not exit on SIGTERM; SIGKILL"
            kill -KILL "$pid"; while _g_alive "$pid"; do sleep 0.05; done
        fi
    done
    rm -rf "$WTH_GALERA_DIR"
    _g_log "stopped and removed $WTH_GALERA_DIR in $(_g_elapsed "$t0")"
    unset WTH_GALERA_DIR WTH_GALERA_URL_1 WTH_GALERA_URL_2 WTH_GALERA_URL_3
}
