#!/usr/bin/env bash
# Checks the systemd units and the generator in systemd/ without installing
# anything:
#   - the generator's output for a given CPU count (ports, drop-ins, links),
#   - `systemd-analyze verify` on every unit, instantiated through the
#     generator's drop-ins, reports nothing,
#   - `systemd-analyze security` scores each service 2.0 or lower,
#   - the settings the packages rely on are there.
#
#   tests/packaging/check-units.sh [CPUS]     (default 4)
# Needs systemd (systemd-analyze) on the machine; no running systemd.
# The checks are strings that `check ... eval` expands later, on purpose.
# shellcheck disable=SC2016,SC2012
set -euo pipefail

cpus=${1:-4}
here=$(cd "$(dirname "$0")" && pwd)
units=$(cd "$here/../../systemd" && pwd)
generator=$units/chat-ha-generator
max_exposure=2.0

failures=0
pass() { echo "ok   - $*"; }
fail() { echo "FAIL - $*"; failures=$((failures + 1)); }
check() { # check DESCRIPTION COMMAND...
    local what=$1; shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A root laid out as the packages install it: systemd's own units (for
# sysinit.target and friends), ours beside them, stand-ins for the binaries.
root=$tmp/root
mkdir -p "$root/usr/lib/systemd" "$root/usr/bin" "$root/etc/systemd/system"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
cp "$units"/chat-frontend@.socket "$units"/chat-frontend@.service \
   "$units"/chat-backend@.socket "$units"/chat-backend@.service \
   "$units"/chat-ha.target "$root/usr/lib/systemd/system/"
for bin in chat-frontend chat-backend; do
    printf '#!/bin/sh\nexit 0\n' >"$root/usr/bin/$bin"
    chmod 755 "$root/usr/bin/$bin"
done

echo "# generator, $cpus CPUs"
check "generator is executable" test -x "$generator"
check "generator parses as POSIX sh (dash -n)" dash -n "$generator"
# systemd-analyze verify --root reads no generator directory: the output goes
# where it reads drop-ins and .wants links alike.
gen=$root/etc/systemd/system
CHAT_HA_NPROC=$cpus CHAT_HA_UNIT_DIRS=$root/usr/lib/systemd/system \
    dash "$generator" "$gen" "$tmp/early" "$tmp/late"
check "generator wrote $((2 * cpus)) socket drop-ins" \
    test "$(find "$gen" -name '50-chat-ha-listen.conf' | wc -l)" -eq $((2 * cpus))
check "generator linked $((4 * cpus)) units into chat-ha.target" \
    test "$(find "$gen/chat-ha.target.wants" -type l | wc -l)" -eq $((4 * cpus))
ports_ok=yes
links_ok=yes
for ((n = 0; n < cpus; n++)); do
    for pair in frontend:9100 backend:9200; do
        name=chat-${pair%%:*}
        port=$((${pair#*:} + n))
        got=$(sed -n 's/^ListenStream=//p' "$gen/$name@$n.socket.d/50-chat-ha-listen.conf")
        [ "$got" = "$port" ] || { echo "     $name@$n listens on '$got', expected $port"; ports_ok=no; }
        for type in socket service; do
            [ "$(readlink "$gen/chat-ha.target.wants/$name@$n.$type")" = "$root/usr/lib/systemd/system/$name@.$type" ] \
                || { echo "     chat-ha.target.wants/$name@$n.$type is wrong"; links_ok=no; }
        done
    done
done
check "instance N listens on 9100+N (frontend) and 9200+N (backend), all addresses" test $ports_ok = yes
check "links point at the templates" test $links_ok = yes
check "no instance at N=$cpus" test ! -e "$gen/chat-frontend@$cpus.socket.d"

only=$tmp/only-backend
mkdir -p "$only/units"
cp "$units"/chat-backend@.socket "$units"/chat-backend@.service "$only/units/"
CHAT_HA_NPROC=2 CHAT_HA_UNIT_DIRS=$only/units dash "$generator" "$only/out"
check "links only the daemons whose units are installed" \
    test "$(ls "$only/out/chat-ha.target.wants" | tr '\n' ' ')" = "chat-backend@0.service chat-backend@0.socket chat-backend@1.service chat-backend@1.socket "
CHAT_HA_NPROC=bogus CHAT_HA_UNIT_DIRS=$only/units dash "$generator" "$tmp/bogus" 2>/dev/null
check "a bad CPU count falls back to one instance" \
    test "$(ls "$tmp/bogus/chat-ha.target.wants" | wc -l)" -eq 2

echo "# systemd-analyze verify"
instances=()
for n in 0 $((cpus - 1)); do
    for name in chat-frontend chat-backend; do
        instances+=("$name@$n.socket" "$name@$n.service")
    done
done
# The man pages are checked with the packages (check-debs.sh), not here.
out=$(cd "$root" && systemd-analyze verify --man=no --root="$root" "${instances[@]}" chat-ha.target 2>&1) && rc=0 || rc=$?
[ -z "$out" ] || printf '%s\n' "$out" | sed 's/^/     /'
check "verify ${instances[*]} chat-ha.target: rc 0, no output" test "$rc" -eq 0 -a -z "$out"
rm -rf "$gen"/*.socket.d
out=$(cd "$root" && systemd-analyze verify --man=no --root="$root" chat-frontend@0.socket 2>&1) && rc=0 || rc=$?
check "without the generator's drop-in a socket is refused (the drop-in is what verify saw)" test "$rc" -ne 0

echo "# systemd-analyze security (exposure <= $max_exposure)"
mkdir -p "$tmp/sec"
for name in chat-frontend chat-backend; do
    cp "$units/$name@.service" "$tmp/sec/$name@0.service"
    out=$(cd "$tmp/sec" && systemd-analyze security --offline=yes --threshold="${max_exposure/./}" "./$name@0.service" 2>&1) && rc=0 || rc=$?
    score=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
    # Anything but the table and the score is a complaint about the file.
    extra=$(printf '%s\n' "$out" | grep -v -e '^  NAME' -e '^[✓✗] ' -e 'Overall exposure' -e '^[[:space:]]*$' || true)
    if [ -n "$extra" ]; then
        printf '%s\n' "$extra" | sed 's/^/     /'
        rc=1
    fi
    check "$name@.service exposure ${score:-?} <= $max_exposure" test "$rc" -eq 0 -a -n "$score"
done

echo "# settings"
has() { grep -qx -- "$2" "$units/$1"; }
for name in chat-frontend chat-backend; do
    s=$name@.service
    check "$s: Type=notify, WatchdogSec=, Restart=on-failure" \
        eval 'has $s Type=notify && has $s WatchdogSec=10s && has $s Restart=on-failure'
    check "$s: ExecStart=/usr/bin/$name --instance %i, CPUAffinity=%i" \
        eval 'has $s "ExecStart=/usr/bin/$name --instance %i" && has $s CPUAffinity=%i'
    stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s\?$/\1/p' "$units/$s")
    check "$s: TimeoutStopSec=${stop}s above the daemon's 10 s graceful stop" test "${stop:-0}" -gt 10
    check "$s: DynamicUser=yes, LimitNOFILE=65536, needs its socket" \
        eval 'has $s DynamicUser=yes && has $s LimitNOFILE=65536 && has $s "Requires=$name@%i.socket"'
    check "$name@.socket: Backlog=4096, no address of its own (the generator's)" \
        eval 'has $name@.socket Backlog=4096 && ! grep -q "^ListenStream" "$units/$name@.socket"'
done
check "chat-ha.target: WantedBy=multi-user.target" has chat-ha.target WantedBy=multi-user.target

if [ "$failures" -ne 0 ]; then
    echo "check-units: $failures check(s) failed"
    exit 1
fi
echo "check-units: all checks passed"
