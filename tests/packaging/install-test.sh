#!/usr/bin/env bash
# Installs the built packages into a booted Debian 12 container (systemd as
# PID 1, no network but its own loopback) and checks what an administrator
# would see:
#   - chat-frontend@N and chat-backend@N (and their sockets) active for every
#     CPU, on ports 9100+N and 9200+N, pinned to CPU N, not running as root;
#   - the stock haproxy.service serves /etc/haproxy/chat-ha.cfg on port 80:
#     GET /front/lobby gives the page, POST /back/message gives 201;
#   - journalctl -u chat-frontend@0 shows the daemon's lines;
#   - systemctl restart chat-backend@0 works and refuses no connection;
#   - an upgrade (reinstall) restarts the instances one at a time;
#   - remove stops the instances; purge removes /etc/chat-ha.
#
#   tests/packaging/install-test.sh DIR_WITH_DEBS [CACHE_DIR]
# Needs root, systemd-container (systemd-nspawn), debootstrap (first run
# only: prepare-root.sh caches the root, default /var/cache/chat-ha-packaging).
# Stops the container it boots and removes its files on exit.
# The checks are strings that `check ... eval` expands later, on purpose.
# shellcheck disable=SC2016,SC2012
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: $0 DIR_WITH_DEBS [CACHE_DIR]" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
debdir=$(cd "$1" && pwd)
cache=$("$here/prepare-root.sh" ${2:+"$2"})

failures=0
pass() { echo "ok   - $*"; }
fail() { echo "FAIL - $*"; failures=$((failures + 1)); }
check() { # check DESCRIPTION COMMAND...
    local what=$1; shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}

state=$(mktemp -d /tmp/chat-ha-install-test.XXXXXX)
machine=chat-ha-pkg-$$
nspawn_pid=
leader=

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
    if [ "$rc" -ne 0 ] && [ -f "$state/nspawn.log" ]; then
        echo "--- container console (last lines)"; tail -30 "$state/nspawn.log"
    fi
    rm -rf "$state"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The five packages, newest of each if the directory holds several versions.
mkdir -p "$state/debs"
for p in chat-ha chat-ha-common chat-frontend chat-backend chat-haproxy; do
    f=$(ls -v "$debdir/${p}_"*.deb 2>/dev/null | tail -1)
    [ -n "$f" ] || { echo "no ${p}_*.deb in $debdir" >&2; exit 1; }
    cp "$f" "$state/debs/"
done
echo "# packages: $(cd "$state/debs" && echo *.deb)"

echo "# booting $machine from $cache/root"
setsid systemd-nspawn -D "$cache/root" -b --machine="$machine" --register=no --keep-unit \
    --volatile=overlay --private-network \
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
    pass "apt-get install chat-ha chat-ha-common chat-frontend chat-backend chat-haproxy"
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

listening=$(ct ss -Hltn | awk '{print $4}')
ports_ok=yes
for ((n = 0; n < cpus; n++)); do
    for port in $((9100 + n)) $((9200 + n)); do
        grep -qx "\*:$port\|\[::\]:$port\|0.0.0.0:$port" <<<"$listening" || { echo "     nothing listens on all addresses, port $port"; ports_ok=no; }
    done
done
check "ports 9100..$((9100 + cpus - 1)) and 9200..$((9200 + cpus - 1)) listen on all addresses" test $ports_ok = yes

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

# --- upgrade: one instance at a time
cursor=$(ct journalctl -q -n 1 --show-cursor | sed -n 's/^-- cursor: //p')
check "upgrade (reinstall) of chat-frontend" eval 'apt_in install --reinstall "/mnt/debs/$(cd "$state/debs" && echo chat-frontend_*.deb)" >"$state/upgrade.log" 2>&1'
seq_seen=$(ct journalctl -q --no-pager --after-cursor="$cursor" _PID=1 -o cat \
    | sed -n 's/^\(Stopping\|Started\) \(chat-frontend@[0-9]*\)\.service .*/\1 \2/p' | tr '\n' ' ')
[ -n "$seq_seen" ] || ct journalctl -q --no-pager --after-cursor="$cursor" -o short-monotonic | tail -40 | sed 's/^/     /'
expected=$(for ((n = 0; n < cpus; n++)); do printf 'Stopping chat-frontend@%d Started chat-frontend@%d ' "$n" "$n"; done)
check "instances restarted one at a time: $seq_seen" test "$seq_seen" = "$expected"
check "all instances active after the upgrade" wait_active "${units[@]}"

# --- remove, purge
check "apt-get remove chat-frontend chat-backend" eval 'apt_in remove chat-frontend chat-backend >"$state/remove.log" 2>&1'
left=$(ct systemctl list-units --plain --no-legend --state=active 'chat-frontend@*' 'chat-backend@*' | cut -d' ' -f1 | tr '\n' ' ')
check "no instance left active after remove (${left:-none})" test -z "$left"
check "ports 9100 and 9200 closed" eval '! ct ss -Hltn | grep -q ":9[12]00 "'
# (chat-ha went with chat-frontend: it has nothing left to purge)
check "apt-get purge chat-ha-common chat-haproxy chat-frontend chat-backend" eval 'apt_in purge chat-ha-common chat-haproxy chat-frontend chat-backend >"$state/purge.log" 2>&1'
check "/etc/chat-ha is gone" eval '! ct test -e /etc/chat-ha'
check "/etc/haproxy/chat-ha.cfg is gone" eval '! ct test -e /etc/haproxy/chat-ha.cfg'
check "no package left in dpkg (ii/rc)" eval '! ct dpkg -l "chat-*" 2>/dev/null | grep -q "^[ir][ic]"'
check "haproxy.service still active on its own configuration, port 80 closed" eval \
    'all_active haproxy.service && ! ct ss -Hltn | grep -q ":80 "'
check "chat-ha.target gone" eval '[ "$(ct systemctl show -P LoadState chat-ha.target)" = not-found ]'

if [ "$failures" -ne 0 ]; then
    echo "install-test: $failures check(s) failed"
    exit 1
fi
echo "install-test: all checks passed"
