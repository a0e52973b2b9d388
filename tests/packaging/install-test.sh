#!/usr/bin/env bash
# Installs the built packages into a booted Debian 12 container (systemd as
# PID 1, on a bridge of its own with this host) and checks what an
# administrator would see:
#   - chat-frontend@N and chat-backend@N (and their sockets) active for every
#     CPU, on 127.0.0.1 ports 9100+N and 9200+N only (from this host, over
#     the bridge, a connection is refused), pinned to CPU N, not running as
#     root, in chat-ha.slice with its memory and task limits;
#   - Redis refuses anonymous commands; its chat-ha user may not FLUSHALL or
#     CONFIG SET; no password is in the journal;
#   - configured to listen on the container's address and admit one address
#     of this host, an instance answers that address and not another one;
#     /metrics answers 404 on the public port, 200 on 127.0.0.1:9300+N only;
#   - the stock haproxy.service serves /etc/haproxy/chat-ha.cfg on port 80:
#     GET /front/lobby gives the page, POST /back/message gives 201;
#   - keepalived.service, confined by chat-keepalived as the chat-ha units
#     are, runs the example configuration: it holds the floating address
#     while HAProxy answers, and gives it up when HAProxy stops;
#   - journalctl -u chat-frontend@0 shows the daemon's lines;
#   - systemctl restart chat-backend@0 works and refuses no connection;
#   - an upgrade (reinstall) restarts the instances one at a time;
#   - remove stops the instances; purge removes /etc/chat-ha and Redis' users.
#
#   tests/packaging/install-test.sh DIR_WITH_DEBS [CACHE_DIR]
# Needs root, systemd-container (systemd-nspawn), debootstrap (first run
# only: prepare-root.sh caches the root, default /var/cache/chat-ha-packaging).
# The bridge chpkgPID holds $CHAT_HA_PKG_NET.1 and .3 (this host) and .2 (the
# container); CHAT_HA_PKG_NET defaults to 10.79.0.
# Stops the container it boots, deletes the bridge and its files on exit.
# The checks are strings that `check ... eval` expands later, on purpose.
# shellcheck disable=SC2016,SC2012
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: $0 DIR_WITH_DEBS [CACHE_DIR]" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
debdir=$(cd "$1" && pwd)
cache=$("$here/prepare-root.sh" ${2:+"$2"})

# pass, fail, check, checks_done
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$here/../lib.sh"

state=$(mktemp -d /tmp/chat-ha-install-test.XXXXXX)
machine=chat-ha-pkg-$$
nspawn_pid=
leader=
net=${CHAT_HA_PKG_NET:-10.79.0}
bridge=chpkg$$
host_addr=$net.1    # this host: admitted once the instances listen on the bridge
other_addr=$net.3   # this host too: never admitted
ct_addr=$net.2      # the container

cleanup() {
    local rc=$?
    if [ -n "$leader" ] && kill -0 "$leader" 2>/dev/null; then
        kill -s SIGRTMIN+4 "$leader" 2>/dev/null || true   # orderly poweroff
    fi
    if [ -n "$nspawn_pid" ]; then
        for _ in $(seq 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$nspawn_pid" 2>/dev/null; then
            echo "container did not power off; killing systemd-nspawn $nspawn_pid" >&2
            kill -s KILL "$nspawn_pid" 2>/dev/null || true
        fi
        wait "$nspawn_pid" 2>/dev/null || true
        # systemd-nspawn leaves this (empty) directory when it is killed.
        rmdir "/run/systemd/nspawn/propagate/$machine" 2>/dev/null || true
    fi
    if ip link show "$bridge" >/dev/null 2>&1; then ip link del "$bridge" || true; fi
    if [ "$rc" -ne 0 ] && [ -f "$state/nspawn.log" ]; then
        echo "--- container console (last lines)"; tail -30 "$state/nspawn.log"
    fi
    rm -rf "$state"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The six packages, newest of each if the directory holds several versions.
mkdir -p "$state/debs"
for p in chat-ha chat-ha-common chat-frontend chat-backend chat-haproxy chat-keepalived chat-redis; do
    f=$(ls -v "$debdir/${p}_"*.deb 2>/dev/null | tail -1)
    [ -n "$f" ] || { echo "no ${p}_*.deb in $debdir" >&2; exit 1; }
    cp "$f" "$state/debs/"
done
echo "# packages: $(cd "$state/debs" && echo *.deb)"

# The container's network: a bridge with two addresses of this host.
other=$(ip -o -4 addr show to "$net.0/24" | awk '{print $2}' | head -1)
[ -z "$other" ] || { echo "$net.0/24 is already on $other; set CHAT_HA_PKG_NET" >&2; exit 1; }
ip link add "$bridge" type bridge
ip addr add "$host_addr/24" dev "$bridge"
ip addr add "$other_addr/24" dev "$bridge"
ip link set "$bridge" up

echo "# booting $machine from $cache/root"
setsid systemd-nspawn -D "$cache/root" -b --machine="$machine" --register=no --keep-unit \
    --volatile=overlay --network-bridge="$bridge" \
    --bind-ro="$state/debs:/mnt/debs" --bind-ro="$cache/debs:/mnt/deps" \
    >"$state/nspawn.log" 2>&1 </dev/null &
nspawn_pid=$!
for _ in $(seq 300); do
    leader=$(ps -o pid=,comm= --ppid "$nspawn_pid" 2>/dev/null | awk '$2 == "systemd" {print $1}' || true)
    [ -n "$leader" ] && break
    kill -0 "$nspawn_pid" 2>/dev/null || { echo "systemd-nspawn exited" >&2; exit 1; }
    sleep 0.1
done
[ -n "$leader" ] || { echo "the container's systemd did not start" >&2; exit 1; }

# Runs a command in the container, with its own clean environment.
ct() { nsenter -t "$leader" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 "$@"; }
for _ in $(seq 100); do
    boot=$(ct systemctl is-system-running --wait 2>/dev/null || true)
    case $boot in running|degraded) break ;; esac
    sleep 0.2
done
check "container booted (system $boot)" test "$boot" = running -o "$boot" = degraded
ct ip addr add "$ct_addr/24" dev host0
ct ip link set host0 up
cpus=$(ct nproc)
echo "# $cpus CPUs"

# --- install
echo "# apt-get install (the packages and their Debian dependencies, from files)"
apt_in() { ct env DEBIAN_FRONTEND=noninteractive apt-get -o Dir::Etc::SourceList=/dev/null -o APT::Sandbox::User=root -y -q "$@"; }
# (globs expand here, on the host: name the files as the container sees them)
files=()
for f in "$cache"/debs/*.deb; do files+=("/mnt/deps/${f##*/}"); done
for f in "$state"/debs/*.deb; do files+=("/mnt/debs/${f##*/}"); done
if apt_in install "${files[@]}" >"$state/install.log" 2>&1; then
    pass "apt-get install chat-ha chat-ha-common chat-frontend chat-backend chat-haproxy chat-keepalived chat-redis"
else
    tail -30 "$state/install.log"; fail "apt-get install"; exit 1
fi
grep -iE 'warning|error|fail' "$state/install.log" | grep -v '^Get:\|^Selecting' | sed 's/^/     install: /' || true

units=()
for ((n = 0; n < cpus; n++)); do
    units+=("chat-frontend@$n.socket" "chat-frontend@$n.service" "chat-backend@$n.socket" "chat-backend@$n.service")
done
all_active() {
    local u bad=0
    for u in "$@"; do
        [ "$(ct systemctl is-active "$u" || true)" = active ] || { echo "     $u: $(ct systemctl is-active "$u" || true)"; bad=1; }
    done
    return $bad
}
wait_active() { for _ in $(seq 50); do all_active "$@" >/dev/null && return 0; sleep 0.2; done; all_active "$@"; }
check "chat-ha.target, redis-server, haproxy active" wait_active chat-ha.target redis-server.service haproxy.service
check "all $((4 * cpus)) instance units active: ${units[*]}" wait_active "${units[@]}"
check "chat-ha.target is enabled" eval '[ "$(ct systemctl is-enabled chat-ha.target)" = enabled ]'

# listens_only ADDRESS: every instance port listens on ADDRESS, on no other.
listens_only() {
    local listening n port ok=0
    listening=$(ct ss -Hltn | awk '{print $4}')
    for ((n = 0; n < cpus; n++)); do
        for port in $((9100 + n)) $((9200 + n)); do
            if [ "$(grep -c ":$port\$" <<<"$listening")" != 1 ] || ! grep -qx "$1:$port" <<<"$listening"; then
                echo "     port $port: $(grep ":$port\$" <<<"$listening" | tr '\n' ' ')"
                ok=1
            fi
        done
    done
    return $ok
}
check "ports 9100..$((9100 + cpus - 1)) and 9200..$((9200 + cpus - 1)) listen on 127.0.0.1 only" listens_only 127.0.0.1
# from_host SOURCE URL [CURL_ARGS...]: curl's exit code and the HTTP status,
# from this host with SOURCE as the source address ("7 000": refused;
# "28 000": no answer in time; "52 000" / "56 000": closed unanswered).
from_host() {
    local code rc=0
    code=$(curl -s -o /dev/null --max-time 3 -w '%{http_code}' --interface "$1" "${@:3}" "$2") || rc=$?
    echo "$rc $code"
}
domain=www.node-services-1.com
for _ in $(seq 50); do   # (until HAProxy's health checks find the instances)
    got=$(from_host "$host_addr" "http://$ct_addr/front/lobby" -H "Host: $domain")
    [ "$got" = "0 200" ] && break
    sleep 0.2
done
check "from this host over the bridge, HAProxy on $ct_addr:80 answers: $got" test "$got" = "0 200"
got=$(from_host "$host_addr" "http://$ct_addr/metrics" -H "Host: $domain")
check "/metrics through HAProxy from the bridge: $got" test "$got" = "0 404"
for port in 9100 9200 9300 9400; do
    got=$(from_host "$host_addr" "http://$ct_addr:$port/")
    check "from this host over the bridge, $ct_addr:$port is refused: $got" test "$got" = "7 000"
done

pin_ok=yes
for ((n = 0; n < cpus; n++)); do
    for d in frontend backend; do
        pid=$(ct systemctl show -P MainPID "chat-$d@$n.service")
        cpu=$(ct sed -n 's/^Cpus_allowed_list:\t*//p' "/proc/$pid/status")
        user=$(ct ps -o user= -p "$pid")
        [ "$cpu" = "$n" ] || { echo "     chat-$d@$n runs on CPUs $cpu"; pin_ok=no; }
        [ "$user" != root ] || { echo "     chat-$d@$n runs as root"; pin_ok=no; }
    done
done
check "instance N is pinned to CPU N and runs as a dynamic user, not root" test $pin_ok = yes

# --- limits
show() { ct systemctl show -P "$2" "$1"; }
ram=$(ct sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)
high=$(show chat-ha.slice MemoryHigh)
max=$(show chat-ha.slice MemoryMax)
echo "# chat-ha.slice: MemoryHigh=$high MemoryMax=$max of $((ram * 1024)) bytes of RAM"
check "chat-ha.slice: MemoryHigh= about 60% and MemoryMax= about 70% of RAM" eval \
    '[ "$((high * 100 / (ram * 1024)))" = 59 ] || [ "$((high * 100 / (ram * 1024)))" = 60 ] &&
     { [ "$((max * 100 / (ram * 1024)))" = 69 ] || [ "$((max * 100 / (ram * 1024)))" = 70 ]; }'
limits_ok=yes
for ((n = 0; n < cpus; n++)); do
    for d in frontend backend; do
        u=chat-$d@$n.service
        got="$(show "$u" Slice) $(show "$u" TasksMax) $(show "$u" OOMScoreAdjust) $(ct cat "/proc/$(show "$u" MainPID)/oom_score_adj")"
        [ "$got" = "chat-ha.slice 576 500 500" ] || { echo "     $u: slice, TasksMax, OOMScoreAdjust, oom_score_adj: $got"; limits_ok=no; }
    done
done
check "every instance in chat-ha.slice, TasksMax=576, OOMScoreAdjust=500 (and so in /proc)" test $limits_ok = yes
check "Redis keeps oom_score_adj 0: the kernel picks an instance first" eval \
    '[ "$(ct cat "/proc/$(show redis-server.service MainPID)/oom_score_adj")" = 0 ]'
# The access list of a socket unit, its words sorted: "deny ... allow ...".
access_list() {
    echo "deny $(show "$1" IPAddressDeny | tr ' ' '\n' | sort | tr '\n' ' ')allow $(show "$1" IPAddressAllow | tr ' ' '\n' | sort | tr '\n' ' ')"
}
got=$(access_list chat-frontend@0.socket)
check "chat-frontend@0.socket: IPAddressDeny=any, IPAddressAllow=loopback: $got" \
    test "$got" = "deny 0.0.0.0/0 ::/0 allow 127.0.0.0/8 ::1/128 "

# --- Redis: nobody anonymous, the daemons' user limited
check "/etc/chat-ha/redis-password: 64 hex characters, root-only" eval \
    '[ "$(ct stat -c %a:%U /etc/chat-ha/redis-password)" = 600:root ] && ct grep -qx "[0-9a-f]\{64\}" /etc/chat-ha/redis-password'
check "/etc/chat-ha/sentinel-password: empty (no Sentinels here), root-only" eval \
    '[ "$(ct stat -c %a:%U:%s /etc/chat-ha/sentinel-password)" = 600:root:0 ]'
check "/etc/redis/admin-password root-only, /etc/redis/chat-ha-users.acl root:redis 0640" eval \
    '[ "$(ct stat -c %a:%U /etc/redis/admin-password)" = 600:root ] &&
     [ "$(ct stat -c %a:%U:%G /etc/redis/chat-ha-users.acl)" = 640:root:redis ]'
check "no password in clear in the ACL file" eval \
    '! ct grep -qF -e "$(ct cat /etc/chat-ha/redis-password)" -e "$(ct cat /etc/redis/admin-password)" /etc/redis/chat-ha-users.acl'
rcli() { ct redis-cli --no-auth-warning "$@" 2>&1; }
as_chat() { rcli --user chat-ha --pass "$(ct cat /etc/chat-ha/redis-password)" "$@"; }
as_admin() { rcli --user admin --pass "$(ct cat /etc/redis/admin-password)" "$@"; }
got=$(rcli ping)
check "anonymous PING: $got" eval '[[ "$got" == NOAUTH* ]]'
got=$(rcli set chat:x 1)
check "anonymous SET: $got" eval '[[ "$got" == NOAUTH* ]]'
got=$(as_chat flushall)
check "chat-ha FLUSHALL: $got" eval '[[ "$got" == NOPERM* ]]'
got=$(as_chat config set maxmemory 1)
check "chat-ha CONFIG SET: $got" eval '[[ "$got" == NOPERM* ]]'
got=$(as_chat set other-key 1)
check "chat-ha SET on a key outside chat:*: $got" eval '[[ "$got" == NOPERM* ]]'
got=$(as_chat publish other-channel x)
check "chat-ha PUBLISH outside chat:*: $got" eval '[[ "$got" == NOPERM* ]]'
got=$(as_chat set chat:install-test 1)
check "chat-ha SET chat:install-test: $got" test "$got" = OK
got=$(rcli --user chat-ha --pass wrong-password ping | tr '\n' ' ')
check "chat-ha with a wrong password: $got" eval '[[ "$got" == *WRONGPASS* ]]'
got=$(as_admin config get maxmemory-policy | tr '\n' ' ')
check "admin CONFIG GET: $got" test "$got" = "maxmemory-policy noeviction "
# The users of a replicated set: each may do its job only.
check "/etc/redis/replica-password and sentinel-user-password: 64 hex characters, root-only, not in the ACL file" eval \
    'for f in /etc/redis/replica-password /etc/redis/sentinel-user-password; do
         [ "$(ct stat -c %a:%U $f)" = 600:root ] && ct grep -qx "[0-9a-f]\{64\}" $f &&
         ! ct grep -qF "$(ct cat $f)" /etc/redis/chat-ha-users.acl || exit 1; done'
as_replica() { rcli --user replica --pass "$(ct cat /etc/redis/replica-password)" "$@"; }
as_sentinel() { rcli --user sentinel --pass "$(ct cat /etc/redis/sentinel-user-password)" "$@"; }
got=$(as_replica ping)
check "replica PING: $got" test "$got" = PONG
got=$(as_replica get chat:install-test)
check "replica GET chat:install-test: $got" eval '[[ "$got" == NOPERM* ]]'
got=$(as_sentinel role | head -1)
check "sentinel ROLE: $got" test "$got" = master
got=$(as_sentinel get chat:install-test)
check "sentinel GET chat:install-test: $got" eval '[[ "$got" == NOPERM* ]]'
got=$(as_sentinel config set maxmemory 1)
check "sentinel CONFIG SET: $got" eval '[[ "$got" == NOPERM* ]]'
redis_conf=$(for k in maxmemory maxmemory-policy client-output-buffer-limit appendonly appendfsync protected-mode bind; do
    as_admin config get "$k" | tr '\n' ' '; done)
echo "# Redis: $redis_conf"
check "Redis runs /etc/redis/chat-ha.conf: maxmemory 1 GiB, noeviction, normal buffers 64mb 16mb 10, AOF every second" eval \
    '[[ "$redis_conf" == *"maxmemory 1073741824 "* && "$redis_conf" == *"maxmemory-policy noeviction "* &&
       "$redis_conf" == *"normal 67108864 16777216 10 "* && "$redis_conf" == *"appendonly yes "* &&
       "$redis_conf" == *"appendfsync everysec "* ]]'

pid=$(ct systemctl show -P MainPID chat-frontend@0.service)
nofile=$(ct sed -n 's/^Max open files *\([0-9]*\) .*/\1/p' "/proc/$pid/limits")
host_nofile=$(ulimit -Hn)
check "LimitNOFILE=65536 applied (soft limit $nofile; this host caps it at $host_nofile)" \
    test "$nofile" -eq 65536 -o "$nofile" -eq "$host_nofile"

# "systemctl start chat-frontend@N" alone brings its socket up too.
last=$((cpus - 1))
ct systemctl stop "chat-frontend@$last.socket" "chat-frontend@$last.service"
check "after stopping chat-frontend@$last and its socket, systemctl start chat-frontend@$last works" \
    ct systemctl start "chat-frontend@$last"
check "chat-frontend@$last.socket is back, port $((9100 + last)) answers" eval \
    'all_active chat-frontend@$last.socket chat-frontend@$last.service &&
     [ "$(ct curl -s --max-time 5 -o /dev/null -w %{http_code} http://127.0.0.1:$((9100 + last))/front/status)" = 200 ]'

# --- through haproxy
curl_in() { ct curl -s --max-time 5 "$@"; }
code=000
for _ in $(seq 50); do
    code=$(curl_in -o /dev/null -w '%{http_code}' http://localhost/front/lobby || true)
    [ "$code" = 200 ] && break
    sleep 0.2
done
check "GET http://localhost/front/lobby through haproxy: $code" test "$code" = 200
check "the page is the chat page" eval 'curl_in http://localhost/front/lobby | grep -q "<title>"'

# --- HAProxy's servers follow the instances: chat-ha-servers.lst as
# shipped ("auto") gives HAProxy one server per instance of this container.
# The instance a request reached, from its status answer.
instance_of() { curl_in "$@" | grep -o '"instance":[0-9]*' | cut -d: -f2; }
written=/run/chat-haproxy/chat-ha.cfg
check "$written: $((2 * cpus)) server lines for $cpus CPUs" \
    test "$(ct grep -c '^    server ' "$written")" -eq $((2 * cpus))
# A cookie naming a server sends the request to that one instance (once its
# health checks found it UP: HAProxy may have started before the instances).
cookies_ok=yes
for ((n = 0; n < cpus; n++)); do
    for _ in $(seq 50); do
        got=$(instance_of -H "Cookie: chat_front=local-$n" http://localhost/front/status)
        [ "$got" = "$n" ] && break
        sleep 0.2
    done
    [ "$got" = "$n" ] || { echo "     cookie chat_front=local-$n reached instance '$got'"; cookies_ok=no; }
done
check "cookie chat_front=local-N reaches chat-frontend@N, for every N below $cpus" test $cookies_ok = yes
# The backends are taken in turn: once all are UP, two rounds reach each.
all_backends=$(seq 0 $((cpus - 1)) | tr '\n' ' ')
for _ in $(seq 50); do
    reached=$(for ((i = 0; i < 2 * cpus; i++)); do instance_of http://localhost/back/status; done | sort -nu | tr '\n' ' ')
    [ "$reached" = "$all_backends" ] && break
    sleep 0.2
done
check "$((2 * cpus)) requests to /back/status reached chat-backend@0..$((cpus - 1)): $reached" test "$reached" = "$all_backends"
# A reload reads the list again; a list it cannot read fails the reload,
# says where, and HAProxy goes on with what it had.
list=/etc/haproxy/chat-ha-servers.lst
ct sed -i 's/ auto$/ 1/' "$list"
check "after listing one instance per daemon, systemctl reload haproxy: 2 server lines" eval \
    'ct systemctl reload haproxy && [ "$(ct grep -c "^    server " "$written")" -eq 2 ]'
ct sh -c "echo 'chat-frontend broken 127.0.0.1' >>$list"
check "a broken list: systemctl reload haproxy fails" eval '! ct systemctl reload haproxy 2>/dev/null'
check "... $written kept, HAProxy still serves, the journal names the line" eval \
    '[ "$(ct grep -c "^    server " "$written")" -eq 2 ] &&
     [ "$(curl_in -o /dev/null -w %{http_code} http://localhost/front/lobby)" = 200 ] &&
     ct journalctl -q --no-pager -u haproxy.service | grep -q "chat-ha-servers.lst:[0-9]*: \"127.0.0.1\" is not ADDRESS:PORT"'
ct sed -i -e '/^chat-frontend broken /d' -e 's/ 1$/ auto/' "$list"
check "the list as shipped again, systemctl reload haproxy: $((2 * cpus)) server lines" eval \
    'ct systemctl reload haproxy && [ "$(ct grep -c "^    server " "$written")" -eq $((2 * cpus)) ]'

body='{"room":"lobby","message":"hello from the package test"}'
code=$(curl_in -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' -d "$body" http://localhost/back/message || true)
check "POST http://localhost/back/message through haproxy: $code" test "$code" = 201
check "GET /back/messages?room=lobby returns it" eval \
    'curl_in "http://localhost/back/messages?room=lobby" | grep -q "hello from the package test"'
check "/etc/chat-ha/publish-tokens exists, root-only (mode $(ct stat -c %a /etc/chat-ha/publish-tokens))" eval \
    '[ "$(ct stat -c %a:%U /etc/chat-ha/publish-tokens)" = 600:root ]'
publish() { curl_in -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' -H "Authorization: Bearer $1" \
    -d '{"rooms":["lobby","news"],"message":"from a server"}' http://localhost/back/publish || true; }
code=$(publish package-test-token-0123456789)
check "POST /back/publish with no token configured: $code" test "$code" = 401
ct sh -c 'echo package-test-token-0123456789 >/etc/chat-ha/publish-tokens'
ct systemctl restart 'chat-backend@*.service'
wait_active "${units[@]}" >/dev/null
code=$(publish package-test-token-0123456789)
check "after adding a token and restarting the backends, POST /back/publish: $code" test "$code" = 201
code=$(publish wrong-token-0123456789)
check "POST /back/publish with another token: $code" test "$code" = 401
check "GET /front/status and /back/status of instance $((cpus - 1)) directly: 200" eval \
    '[ "$(curl_in -o /dev/null -w %{http_code} http://127.0.0.1:$((9100 + cpus - 1))/front/status)" = 200 ] &&
     [ "$(curl_in -o /dev/null -w %{http_code} http://127.0.0.1:$((9200 + cpus - 1))/back/status)" = 200 ]'

# --- journal
lines=$(ct journalctl -q --no-pager -u chat-frontend@0.service -t chat-frontend | wc -l)
check "journalctl -u chat-frontend@0 shows the daemon's lines ($lines)" test "$lines" -gt 0
check "journalctl -t chat-backend shows the daemons' lines" eval '[ "$(ct journalctl -q --no-pager -t chat-backend | wc -l)" -gt 0 ]'

warnings=$(ct journalctl -q --no-pager -p warning -t chat-frontend -t chat-backend)
[ -z "$warnings" ] || printf '%s\n' "$warnings" | sed 's/^/     /'
check "the daemons logged no warning or error" test -z "$warnings"

# Redis replays its append-only file at start as the default user: a user
# without every permission there would drop the posts' transactions. (The
# daemons warn that they lost Redis meanwhile: after the check above.)
ct systemctl restart redis-server.service
history=""
for _ in $(seq 50); do
    history=$(curl_in "http://localhost/back/messages?room=lobby" || true)
    [[ "$history" == *'"messages"'* ]] && break
    sleep 0.2
done
check "after Redis restarts, the post is still in the history" eval '[[ "$history" == *"hello from the package test"* ]]'

# --- restart refuses no connection
old=$(ct systemctl show -P MainPID chat-backend@0.service)
# Prints the curl exit codes of the requests that failed (7 refused, 52 empty
# reply, 56 reset, 28 timed out), nothing if none did.
ct sh -c 'i=0; while [ $i -lt 150 ]; do
            curl -s -o /dev/null --max-time 15 http://127.0.0.1:9200/back/status || echo "curl exit $?"
            i=$((i + 1)); sleep 0.02; done' >"$state/during-restart" 2>&1 &
probe=$!
sleep 0.5
check "systemctl restart chat-backend@0" ct systemctl restart chat-backend@0.service
wait "$probe" || true
new=$(ct systemctl show -P MainPID chat-backend@0.service)
check "chat-backend@0 active with a new process ($old -> $new)" eval '[ "$new" != "$old" ] && [ "$new" != 0 ] && all_active chat-backend@0.service'
refused=$(grep -c 'exit 7$' "$state/during-restart" || true)
failed=$(grep -c . "$state/during-restart" || true)
[ "$failed" -eq 0 ] || sort "$state/during-restart" | uniq -c | sed 's/^/     /'
check "no connection refused during the restart ($refused of 150 refused)" test "$refused" -eq 0
# A request the stopping process accepted but did not answer is the
# daemon's graceful stop, not the units': reported, not failed.
[ "$failed" -eq "$refused" ] || echo "warn - $((failed - refused)) of 150 requests accepted but not answered by the stopping process"

# --- several hosts: the instances on the container's address, admitting
# one address of this host ($host_addr) and not another ($other_addr)
toml=/etc/chat-ha/chat-ha.toml
ct sed -i -e "s|^listen = \"127.0.0.1:9100\"|listen = \"$ct_addr:9100\"|" \
    -e "s|^listen = \"127.0.0.1:9200\"|listen = \"$ct_addr:9200\"|" \
    -e "s|^allow = .*|allow = [\"$host_addr/32\"]|" "$toml"
check "chat-frontend --print-network reads the new configuration" eval \
    '[ "$(ct chat-frontend --print-network | tr "\n" " ")" = "address $ct_addr port 9100 allow $host_addr/32 " ]'
ct systemctl daemon-reload
ct systemctl stop chat-ha.target
ct systemctl start chat-ha.target
check "after daemon-reload and a restart of chat-ha.target, all instance units active" wait_active "${units[@]}"
got=$(access_list "chat-backend@$last.socket")
check "chat-backend@$last.socket: IPAddressDeny=any, IPAddressAllow=$host_addr: $got" \
    test "$got" = "deny 0.0.0.0/0 ::/0 allow $host_addr/32 "
check "ports 9100.. and 9200.. listen on $ct_addr only" listens_only "$ct_addr"
unanswered_ok=yes
kernel_drops=0
for ((n = 0; n < cpus; n++)); do
    for d in front back; do
        if [ $d = front ]; then port=$((9100 + n)); else port=$((9200 + n)); fi
        url=http://$ct_addr:$port/$d/status
        got=$(from_host "$host_addr" "$url")
        [ "$got" = "0 200" ] || { echo "     from $host_addr (admitted): $url: $got"; unanswered_ok=no; }
        got=$(from_host "$other_addr" "$url")
        case $got in
        "28 000") kernel_drops=$((kernel_drops + 1)) ;;   # the SYN dropped: no connection at all
        "52 000" | "56 000") ;;                           # accepted, then closed unanswered by the daemon
        *) echo "     from $other_addr (not admitted): $url: $got"; unanswered_ok=no ;;
        esac
    done
done
check "every instance answers $host_addr and gives $other_addr no answer" test $unanswered_ok = yes
echo "# who refused $other_addr: the kernel (IPAddressDeny=, no connection) for $kernel_drops of $((2 * cpus)) ports, the daemon (closed on accept) for the others"
# Does the kernel apply a socket unit's access list here? Give chat-frontend@0's
# socket a list that admits $other_addr only, while the daemon still admits
# $host_addr only: $host_addr then gets an answer only if the kernel ignores
# the list. (systemd needs cgroup BPF, which a container may not have.)
probe=/etc/systemd/system/chat-frontend@0.socket.d/99-install-test.conf
ct mkdir -p "${probe%/*}"
ct sh -c "printf '[Socket]\nIPAddressAllow=\nIPAddressAllow=$other_addr/32\n' >$probe"
ct systemctl daemon-reload
ct systemctl stop chat-frontend@0.service chat-frontend@0.socket
ct systemctl start chat-frontend@0.socket
got=$(from_host "$host_addr" "http://$ct_addr:9100/front/status")
case $got in
"28 000") echo "# the kernel applies IPAddressDeny=/IPAddressAllow= in this container (probe: $got)" ;;
"0 200") echo "# the kernel does NOT apply IPAddressDeny=/IPAddressAllow= in this container: only the daemons' own check refuses (probe: $got)" ;;
*) echo "# kernel access lists: probe gave $got" ;;
esac
ct rm "$probe"
ct systemctl daemon-reload
ct systemctl stop chat-frontend@0.service chat-frontend@0.socket
ct systemctl start chat-frontend@0.socket chat-frontend@0.service
check "chat-frontend@0 back on the generated access list, answering $host_addr" eval \
    '[ "$(access_list chat-frontend@0.socket)" = "deny 0.0.0.0/0 ::/0 allow $host_addr/32 " ] &&
     [ "$(from_host "$host_addr" "http://$ct_addr:9100/front/status")" = "0 200" ]'
got=$(from_host "$host_addr" "http://$ct_addr:9100/metrics")
check "GET /metrics on the public port 9100 from $host_addr: $got" test "$got" = "0 404"
for port in 9300 9400; do
    got=$(from_host "$host_addr" "http://$ct_addr:$port/metrics")
    check "from this host, $ct_addr:$port (metrics) is refused: $got" test "$got" = "7 000"
done
metrics_ok=yes
for ((n = 0; n < cpus; n++)); do
    for port in $((9300 + n)) $((9400 + n)); do
        code=$(curl_in -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/metrics" || true)
        [ "$code" = 200 ] || { echo "     http://127.0.0.1:$port/metrics: $code"; metrics_ok=no; }
    done
done
check "inside the host, GET http://127.0.0.1:9300+N/metrics and :9400+N/metrics: 200" test $metrics_ok = yes

# --- upgrade: one instance at a time
cursor=$(ct journalctl -q -n 1 --show-cursor | sed -n 's/^-- cursor: //p')
check "upgrade (reinstall) of chat-frontend" eval 'apt_in install --reinstall "/mnt/debs/$(cd "$state/debs" && echo chat-frontend_*.deb)" >"$state/upgrade.log" 2>&1'
seq_seen=$(ct journalctl -q --no-pager --after-cursor="$cursor" _PID=1 -o cat \
    | sed -n 's/^\(Stopping\|Started\) \(chat-frontend@[0-9]*\)\.service .*/\1 \2/p' | tr '\n' ' ')
[ -n "$seq_seen" ] || ct journalctl -q --no-pager --after-cursor="$cursor" -o short-monotonic | tail -40 | sed 's/^/     /'
expected=$(for ((n = 0; n < cpus; n++)); do printf 'Stopping chat-frontend@%d Started chat-frontend@%d ' "$n" "$n"; done)
check "instances restarted one at a time: $seq_seen" test "$seq_seen" = "$expected"
check "all instances active after the upgrade" wait_active "${units[@]}"

# --- secrets stay out of the journal
# --- keepalived (chat-keepalived)
max_exposure=2.0
exposure=$(ct systemd-analyze security --no-pager keepalived.service | sed -n 's/.*exposure level for keepalived\.service: \([0-9.]*\).*/\1/p')
check "keepalived.service confined: exposure ${exposure:-?} <= $max_exposure" \
    awk -v e="${exposure:-99}" -v max=$max_exposure 'BEGIN { exit !(e <= max) }'
# The example, filled in as an operator would: this container's address,
# a peer that never answers (this host), a floating address of the bridge.
vip=$net.10
ct sed -e "s|^    interface eth1|    interface host0|" -e "s|^    unicast_src_ip .*|    unicast_src_ip $ct_addr|" \
    -e "s|^        10.0.0.6\$|        $other_addr|" -e "s|^        10.0.0.10/24 dev eth1|        $vip/24 dev host0|" \
    /usr/share/doc/chat-keepalived/examples/keepalived.conf.example | ct tee /etc/keepalived/keepalived.conf >/dev/null
check "keepalived.conf from the example names $vip on host0" ct grep -q "^        $vip/24 dev host0\$" /etc/keepalived/keepalived.conf
holds_vip() { ct ip -o -4 addr show dev host0 | grep -q " $vip/24 "; }
# wait_until SECONDS COMMAND...: true once COMMAND succeeds, within SECONDS.
wait_until() { local n=$(($1 * 10)); shift; for _ in $(seq "$n"); do "$@" && return 0; sleep 0.1; done; "$@"; }
ct systemctl start keepalived.service
check "keepalived.service active, holding $vip while HAProxy answers" eval \
    'wait_active keepalived.service && wait_until 10 holds_vip'
got=$(from_host "$host_addr" "http://$vip/haproxy-health")
check "GET http://$vip/haproxy-health from this host (HAProxy's own answer): $got" test "$got" = "0 200"
ct systemctl stop haproxy.service
check "HAProxy stopped: keepalived gives $vip up (FAULT)" eval \
    'wait_until 10 eval "! holds_vip" && ct journalctl -q --no-pager -u keepalived.service | grep -q "Entering FAULT STATE"'
ct journalctl -q --no-pager -o cat -u keepalived.service | sed 's/^/     keepalived: /'
ct systemctl start haproxy.service
check "HAProxy back: keepalived takes $vip again" eval 'wait_active haproxy.service && wait_until 10 holds_vip'
ct systemctl stop keepalived.service

secrets_seen=$(ct journalctl -q --no-pager -o cat | grep -c -F -e "$(ct cat /etc/chat-ha/redis-password)" -e "$(ct cat /etc/redis/admin-password)" || true)
check "no Redis password in the journal ($secrets_seen lines)" test "$secrets_seen" -eq 0

# --- remove, purge
check "apt-get remove chat-frontend chat-backend" eval 'apt_in remove chat-frontend chat-backend >"$state/remove.log" 2>&1'
left=$(ct systemctl list-units --plain --no-legend --state=active 'chat-frontend@*' 'chat-backend@*' | cut -d' ' -f1 | tr '\n' ' ')
check "no instance left active after remove (${left:-none})" test -z "$left"
check "ports 9100 and 9200 closed" eval '! ct ss -Hltn | grep -q ":9[12]00 "'
# (chat-ha went with chat-frontend: it has nothing left to purge)
check "apt-get purge chat-ha-common chat-haproxy chat-keepalived chat-frontend chat-backend chat-redis" eval 'apt_in purge chat-ha-common chat-haproxy chat-keepalived chat-frontend chat-backend chat-redis >"$state/purge.log" 2>&1'
check "/etc/chat-ha is gone" eval '! ct test -e /etc/chat-ha'
check "/etc/redis/chat-ha-users.acl, the passwords and chat-ha.conf are gone" eval \
    '! ct test -e /etc/redis/chat-ha-users.acl && ! ct test -e /etc/redis/admin-password && ! ct test -e /etc/redis/chat-ha.conf &&
     ! ct test -e /etc/redis/replica-password && ! ct test -e /etc/redis/sentinel-user-password'
check "redis-server.service active again on Debian's configuration (anonymous PING: PONG)" eval \
    'wait_active redis-server.service && [ "$(rcli ping)" = PONG ]'
check "/etc/haproxy/chat-ha.cfg is gone" eval '! ct test -e /etc/haproxy/chat-ha.cfg'
check "keepalived.service is Debian's alone again" eval '[ -z "$(ct systemctl show -P DropInPaths keepalived.service)" ]'
check "no package left in dpkg (ii/rc)" eval '! ct dpkg -l "chat-*" 2>/dev/null | grep -q "^[ir][ic]"'
check "haproxy.service still active on its own configuration, port 80 closed" eval \
    'all_active haproxy.service && ! ct ss -Hltn | grep -q ":80 "'
check "chat-ha.target gone" eval '[ "$(ct systemctl show -P LoadState chat-ha.target)" = not-found ]'

checks_done install-test
