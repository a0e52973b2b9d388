#!/usr/bin/env bash
# Checks the systemd units and the generator in systemd/ without installing
# anything:
#   - the generator's output for a given CPU count (addresses, ports, access
#     lists, CPUs, drop-ins, links), from what the daemons' --print-network
#     says, and its fallback to loopback when a daemon rejects its
#     configuration,
#   - the CPUs it pins instances to when the usable ones skip some (a CPU
#     list, the generator's real affinity), and its limit of 100 instances,
#   - `systemd-analyze verify` on every unit, instantiated through the
#     generator's drop-ins, reports nothing,
#   - `systemd-analyze security` scores each service 2.0 or lower,
#   - the settings the packages rely on are there (limits, credentials).
#
#   tests/packaging/check-units.sh [CPUS]     (default 64)
# Needs systemd (systemd-analyze) on the machine; no running systemd.
# The checks are strings that `check ... eval` expands later, on purpose.
# shellcheck disable=SC2016,SC2012
set -euo pipefail

cpus=${1:-64}
here=$(cd "$(dirname "$0")" && pwd)
units=$(cd "$here/../../systemd" && pwd)
generator=$units/chat-ha-generator
max_exposure=2.0

# pass, fail, check, checks_done
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$here/../lib.sh"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A root laid out as the packages install it: systemd's own units (for
# sysinit.target and friends), ours beside them, stand-ins for the binaries.
root=$tmp/root
mkdir -p "$root/usr/lib/systemd" "$root/usr/bin" "$root/etc/systemd/system"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
cp "$units"/chat-frontend@.socket "$units"/chat-frontend@.service \
   "$units"/chat-backend@.socket "$units"/chat-backend@.service \
   "$units"/chat-ha.target "$units"/chat-ha.slice "$root/usr/lib/systemd/system/"
# stand_in DIR NAME ADDRESS PORT ALLOW: a daemon whose --print-network says
# what the real one says for a configuration with these values.
stand_in() {
    mkdir -p "$1"
    printf '#!/bin/sh\n[ "$1" = --print-network ] || exit 0\nprintf "address %s\\nport %s\\nallow %s\\n"\n' \
        "$3" "$4" "$5" >"$1/$2"
    chmod 755 "$1/$2"
}
# The packaged configuration's values.
stand_in "$root/usr/bin" chat-frontend 127.0.0.1 9100 "127.0.0.0/8 ::1/128"
stand_in "$root/usr/bin" chat-backend 127.0.0.1 9200 "127.0.0.0/8 ::1/128"
# Reads one setting of a generated drop-in.
setting() { sed -n "s/^$2=//p" "$1"; }

echo "# generator, $cpus CPUs"
check "generator is executable" test -x "$generator"
check "generator parses as POSIX sh (dash -n)" dash -n "$generator"
# systemd-analyze verify --root reads no generator directory: the output goes
# where it reads drop-ins and .wants links alike.
gen=$root/etc/systemd/system
CHAT_HA_NPROC=$cpus CHAT_HA_UNIT_DIRS=$root/usr/lib/systemd/system CHAT_HA_BIN_DIR=$root/usr/bin \
    dash "$generator" "$gen" "$tmp/early" "$tmp/late"
check "generator wrote $((2 * cpus)) socket drop-ins" \
    test "$(find "$gen" -name '50-chat-ha-listen.conf' | wc -l)" -eq $((2 * cpus))
check "generator wrote $((2 * cpus)) service drop-ins pinning a CPU" \
    test "$(find "$gen" -name '50-chat-ha-cpu.conf' | wc -l)" -eq $((2 * cpus))
check "generator linked $((4 * cpus)) units into chat-ha.target" \
    test "$(find "$gen/chat-ha.target.wants" -type l | wc -l)" -eq $((4 * cpus))
ports_ok=yes
links_ok=yes
cpus_ok=yes
for ((n = 0; n < cpus; n++)); do
    for pair in frontend:9100 backend:9200; do
        name=chat-${pair%%:*}
        port=$((${pair#*:} + n))
        dropin=$gen/$name@$n.socket.d/50-chat-ha-listen.conf
        got="$(setting "$dropin" ListenStream) deny $(setting "$dropin" IPAddressDeny) allow $(setting "$dropin" IPAddressAllow)"
        want="127.0.0.1:$port deny any allow 127.0.0.0/8 ::1/128"
        [ "$got" = "$want" ] || { echo "     $name@$n: '$got', expected '$want'"; ports_ok=no; }
        got=$(setting "$gen/$name@$n.service.d/50-chat-ha-cpu.conf" CPUAffinity)
        [ "$got" = "$n" ] || { echo "     $name@$n: CPUAffinity '$got', expected $n"; cpus_ok=no; }
        for type in socket service; do
            [ "$(readlink "$gen/chat-ha.target.wants/$name@$n.$type")" = "$root/usr/lib/systemd/system/$name@.$type" ] \
                || { echo "     chat-ha.target.wants/$name@$n.$type is wrong"; links_ok=no; }
        done
    done
done
check "instance N listens on 127.0.0.1:9100+N (frontend) and :9200+N (backend), admits loopback only" test $ports_ok = yes
check "instance N of each daemon is pinned to CPU N (CPUs 0-$((cpus - 1)))" test $cpus_ok = yes
check "links point at the templates" test $links_ok = yes
check "no instance at N=$cpus" test ! -e "$gen/chat-frontend@$cpus.socket.d"

# Several hosts: the address of this host, the load balancers admitted.
multi=$tmp/multi
stand_in "$multi/bin" chat-frontend 10.0.0.5 9100 "10.0.0.10/32 10.0.0.11/32"
stand_in "$multi/bin" chat-backend "[fd00::5]" 9250 "fd00::10/128"
CHAT_HA_NPROC=2 CHAT_HA_UNIT_DIRS=$root/usr/lib/systemd/system CHAT_HA_BIN_DIR=$multi/bin \
    dash "$generator" "$multi/out"
check "a configured address and allow list: chat-frontend@1 on 10.0.0.5:9101, admits the two load balancers" eval \
    '[ "$(setting "$multi/out/chat-frontend@1.socket.d/50-chat-ha-listen.conf" ListenStream)" = 10.0.0.5:9101 ] &&
     [ "$(setting "$multi/out/chat-frontend@1.socket.d/50-chat-ha-listen.conf" IPAddressAllow)" = "10.0.0.10/32 10.0.0.11/32" ] &&
     [ "$(setting "$multi/out/chat-frontend@1.socket.d/50-chat-ha-listen.conf" IPAddressDeny)" = any ]'
check "an IPv6 address and another port: chat-backend@1 on [fd00::5]:9251, admits fd00::10/128" eval \
    '[ "$(setting "$multi/out/chat-backend@1.socket.d/50-chat-ha-listen.conf" ListenStream)" = "[fd00::5]:9251" ] &&
     [ "$(setting "$multi/out/chat-backend@1.socket.d/50-chat-ha-listen.conf" IPAddressAllow)" = fd00::10/128 ]'

# A configuration the daemon rejects, or output that could not go into a
# unit file: loopback only, and the reason on stderr.
bad=$tmp/bad
mkdir -p "$bad/bin"
printf '#!/bin/sh\necho "/etc/chat-ha/chat-ha.toml: line 3: unknown key" >&2\nexit 2\n' >"$bad/bin/chat-frontend"
chmod 755 "$bad/bin/chat-frontend"
stand_in "$bad/bin" chat-backend 10.0.0.5 9200 "10.0.0.10/32 any"
CHAT_HA_NPROC=2 CHAT_HA_UNIT_DIRS=$root/usr/lib/systemd/system CHAT_HA_BIN_DIR=$bad/bin \
    dash "$generator" "$bad/out" 2>"$bad/stderr"
sed 's/^/     stderr: /' "$bad/stderr"
for name in chat-frontend chat-backend; do
    base=9100; [ $name = chat-frontend ] || base=9200
    check "$name rejected: falls back to 127.0.0.1:$((base + 1)), admits loopback only" eval \
        '[ "$(setting "$bad/out/$name@1.socket.d/50-chat-ha-listen.conf" ListenStream)" = 127.0.0.1:$((base + 1)) ] &&
         [ "$(grep -c "^IPAddress" "$bad/out/$name@1.socket.d/50-chat-ha-listen.conf")" = 2 ] &&
         [ "$(setting "$bad/out/$name@1.socket.d/50-chat-ha-listen.conf" IPAddressAllow)" = "127.0.0.0/8 ::1/128" ]'
done
check "the generator says why on stderr" eval \
    'grep -q "chat-frontend --print-network failed: /etc/chat-ha/chat-ha.toml: line 3" "$bad/stderr" &&
     grep -q "chat-backend printed an unusable allow list" "$bad/stderr"'

only=$tmp/only-backend
mkdir -p "$only/units"
cp "$units"/chat-backend@.socket "$units"/chat-backend@.service "$only/units/"
CHAT_HA_NPROC=2 CHAT_HA_UNIT_DIRS=$only/units CHAT_HA_BIN_DIR=$root/usr/bin dash "$generator" "$only/out"
check "links only the daemons whose units are installed" \
    test "$(ls "$only/out/chat-ha.target.wants" | tr '\n' ' ')" = "chat-backend@0.service chat-backend@0.socket chat-backend@1.service chat-backend@1.socket "
rm "$multi/bin/chat-frontend"
CHAT_HA_NPROC=2 CHAT_HA_UNIT_DIRS=$root/usr/lib/systemd/system CHAT_HA_BIN_DIR=$multi/bin dash "$generator" "$multi/only-backend"
check "writes nothing for a daemon whose binary is not installed" \
    test "$(ls "$multi/only-backend" | tr '\n' ' ')" = "chat-backend@0.service.d chat-backend@0.socket.d chat-backend@1.service.d chat-backend@1.socket.d chat-ha.target.wants "
CHAT_HA_NPROC=bogus CHAT_HA_UNIT_DIRS=$only/units CHAT_HA_BIN_DIR=$root/usr/bin dash "$generator" "$tmp/bogus" 2>/dev/null
check "a bad CPU count falls back to one instance, pinned to no CPU" eval \
    '[ "$(ls "$tmp/bogus/chat-ha.target.wants" | wc -l)" -eq 2 ] && [ -z "$(find "$tmp/bogus" -name 50-chat-ha-cpu.conf)" ]'

echo "# generator, CPUs that are not 0 to N-1"
# pinned DIR NAME: "N:CPU:PORT" for each instance of NAME the generator wrote
# into DIR, in the order of N (CPU empty: not pinned).
pinned() {
    local n=0 cpu
    while [ -e "$1/$2@$n.socket.d" ]; do
        cpu=
        [ ! -e "$1/$2@$n.service.d/50-chat-ha-cpu.conf" ] || cpu=$(setting "$1/$2@$n.service.d/50-chat-ha-cpu.conf" CPUAffinity)
        printf '%s ' "$n:$cpu:$(setting "$1/$2@$n.socket.d/50-chat-ha-listen.conf" ListenStream | sed 's/.*://')"
        n=$((n + 1))
    done
}
# generate DIR ENV...: runs the generator for the packaged configuration.
generate() {
    local dir=$1; shift
    env "$@" CHAT_HA_UNIT_DIRS="$root/usr/lib/systemd/system" CHAT_HA_BIN_DIR="$root/usr/bin" \
        dash "$generator" "$dir" 2>"$dir.stderr"
}
generate "$tmp/set" CHAT_HA_CPUS=0,2,5-7
for pair in frontend:9100 backend:9200; do
    base=${pair#*:}
    got=$(pinned "$tmp/set" "chat-${pair%%:*}")
    want="0:0:$base 1:2:$((base + 1)) 2:5:$((base + 2)) 3:6:$((base + 3)) 4:7:$((base + 4)) "
    check "CPUs 0,2,5-7: chat-${pair%%:*}@0..4 on CPUs 0 2 5 6 7, ports $base..$((base + 4)) (got N:CPU:PORT $got)" test "$got" = "$want"
done
check "CPUs 0,2,5-7: 20 units linked into chat-ha.target" test "$(find "$tmp/set/chat-ha.target.wants" -type l | wc -l)" -eq 20
generate "$tmp/unsorted" CHAT_HA_CPUS=7,3,3
got=$(pinned "$tmp/unsorted" chat-frontend)
check "CPUs 7,3,3: two instances, on 3 then 7 (got $got)" test "$got" = "0:3:9100 1:7:9101 "
# The generator's own affinity, as a container's cpuset or systemd's
# CPUAffinity= would narrow it: no variable, the CPUs the kernel reports.
# (On a host of one CPU this is CPU 0 and skips nothing, but still reads it.)
last=$(taskset -cp $$ | sed 's/.*: *//' | tr ',' '\n' | tail -1 | sed 's/.*-//')
taskset -c "$last" env -u CHAT_HA_CPUS -u CHAT_HA_NPROC CHAT_HA_UNIT_DIRS="$root/usr/lib/systemd/system" CHAT_HA_BIN_DIR="$root/usr/bin" \
    dash "$generator" "$tmp/affinity"
got=$(pinned "$tmp/affinity" chat-backend)
check "run on CPU $last alone (taskset): one instance per daemon, on CPU $last (got $got)" test "$got" = "0:$last:9200 "
env -u CHAT_HA_CPUS -u CHAT_HA_NPROC CHAT_HA_UNIT_DIRS="$root/usr/lib/systemd/system" CHAT_HA_BIN_DIR="$root/usr/bin" \
    dash "$generator" "$tmp/all"
check "run on every CPU: $(nproc) instances per daemon, as many as nproc counts" \
    test "$(find "$tmp/all" -name 50-chat-ha-cpu.conf -path '*chat-frontend@*' | wc -l)" -eq "$(nproc)"
generate "$tmp/many" CHAT_HA_NPROC=128
check "128 CPUs: instances on the first 100 only (chat-frontend@99 on CPU 99, port 9199; no @100), and it says so" eval \
    '[ "$(pinned "$tmp/many" chat-frontend | wc -w)" -eq 100 ] && [ "$(setting "$tmp/many/chat-frontend@99.service.d/50-chat-ha-cpu.conf" CPUAffinity)" = 99 ] &&
     [ "$(setting "$tmp/many/chat-frontend@99.socket.d/50-chat-ha-listen.conf" ListenStream)" = 127.0.0.1:9199 ] &&
     [ ! -e "$tmp/many/chat-frontend@100.socket.d" ] && grep -q "128 CPUs, running instances on the first 100 only" "$tmp/many.stderr"'
generate "$tmp/badlist" CHAT_HA_CPUS=3-1
check "a CPU list it cannot read: one instance, pinned to no CPU, and it says why" eval \
    '[ "$(pinned "$tmp/badlist" chat-frontend)" = "0::9100 " ] && [ -z "$(find "$tmp/badlist" -name 50-chat-ha-cpu.conf)" ] &&
     grep -q "CHAT_HA_CPUS is not a CPU list: .3-1." "$tmp/badlist.stderr"'

echo "# systemd-analyze verify"
instances=()
for n in 0 $((cpus - 1)); do
    for name in chat-frontend chat-backend; do
        instances+=("$name@$n.socket" "$name@$n.service")
    done
done
# The man pages are checked with the packages (check-debs.sh), not here.
out=$(cd "$root" && systemd-analyze verify --man=no --root="$root" "${instances[@]}" chat-ha.target chat-ha.slice 2>&1) && rc=0 || rc=$?
[ -z "$out" ] || printf '%s\n' "$out" | sed 's/^/     /'
check "verify ${instances[*]} chat-ha.target chat-ha.slice: rc 0, no output" test "$rc" -eq 0 -a -z "$out"
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
    check "$s: ExecStart=/usr/bin/$name --instance %i, no CPUAffinity= (the generator's drop-in pins it)" \
        eval 'has $s "ExecStart=/usr/bin/$name --instance %i" && ! grep -q "^CPUAffinity" "$units/$s"'
    stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s\?$/\1/p' "$units/$s")
    check "$s: TimeoutStopSec=${stop}s above the daemon's 10 s graceful stop" test "${stop:-0}" -gt 10
    check "$s: DynamicUser=yes, LimitNOFILE=65536, needs its socket" \
        eval 'has $s DynamicUser=yes && has $s LimitNOFILE=65536 && has $s "Requires=$name@%i.socket"'
    check "$name@.socket: Backlog=4096, no address of its own (the generator's)" \
        eval 'has $name@.socket Backlog=4096 && ! grep -q "^ListenStream" "$units/$name@.socket"'
    check "$s: in chat-ha.slice, OOMScoreAdjust=500, TasksMax=576" \
        eval 'has $s Slice=chat-ha.slice && has $s OOMScoreAdjust=500 && has $s TasksMax=576'
    check "$s: the Redis password as a credential" has "$s" LoadCredential=redis-password:/etc/chat-ha/redis-password
    check "$s: the Sentinels' password as a credential" has "$s" LoadCredential=sentinel-password:/etc/chat-ha/sentinel-password
    check "$name@.socket: in chat-ha.slice" has "$name@.socket" Slice=chat-ha.slice
done
check "chat-backend@.service: the publish tokens as a credential" \
    has chat-backend@.service LoadCredential=publish-tokens:/etc/chat-ha/publish-tokens
check "chat-ha.slice: MemoryHigh=60%, MemoryMax=70%, no swap" \
    eval 'has chat-ha.slice MemoryHigh=60% && has chat-ha.slice MemoryMax=70% && has chat-ha.slice MemorySwapMax=0'
check "chat-ha.target: WantedBy=multi-user.target" has chat-ha.target WantedBy=multi-user.target

checks_done check-units
