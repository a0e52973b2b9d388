#!/usr/bin/env bash
# Boots the Vagrantfile's machines (lb1, lb2, front1, front2, back1, back2,
# and redis1..redis3 with Sentinel, or redis1..redis6 as a Redis Cluster
# with CHAT_HA_RIG_REDIS=cluster) as LXC containers, installs the chat-ha
# packages of target/debian in them, and waits until every service answers
# through the load balancers' floating address.
# Idempotent: machines already up are left as they are. A rig of the other
# layout must be taken down first.
#
#   tests/rig/up.sh                              (make rig)
#   CHAT_HA_RIG_REDIS=cluster tests/rig/up.sh
#
# Creates, and tests/rig/down.sh removes: the bridges chatha0 (10.78.0.1/24,
# DHCP and DNS by a dnsmasq of the rig's own) and chatha1 (10.78.1.1/24, the
# machines' fixed addresses), the containers chat-ha-rig-*, the box
# registration, and target/rig/ (Vagrant's state, the packages installed).
# Needs root; installs lxc, vagrant, vagrant-lxc and dnsmasq-base when missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/rig/common.sh
. "$here/common.sh"
need_root

# --- host packages (lxc-templates holds the distribution configs the box's
# lxc-config includes; it is only a recommendation of lxc)
missing=
for p in lxc lxc-templates vagrant vagrant-lxc dnsmasq-base; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
    log "installing$missing"
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null; } \
        || die "could not install$missing"
fi

# --- one layout at a time: the machines of both share names and addresses
if [ -s "$RIG_LAYOUT_FILE" ] && [ "$(cat "$RIG_LAYOUT_FILE")" != "$RIG_REDIS" ]; then
    die "a rig of the $(cat "$RIG_LAYOUT_FILE") layout is up (CHAT_HA_RIG_REDIS=$RIG_REDIS asks for $RIG_REDIS): tests/rig/down.sh first"
fi
mkdir -p "$RIG_STATE"
echo "$RIG_REDIS" >"$RIG_LAYOUT_FILE"

# --- the packages to install: a snapshot of target/debian, so that a
# `make deb` running meanwhile does not pull them from under the machines.
mkdir -p "$RIG_STATE/pkgs"
for p in chat-ha-common chat-frontend chat-backend chat-haproxy chat-keepalived chat-redis; do
    # shellcheck disable=SC2012
    f=$(ls -v "$RIG_REPO/target/debian/${p}_"*.deb 2>/dev/null | tail -1)
    if [ -z "$f" ]; then
        # A snapshot taken earlier will do while the machines are up already.
        ls "$RIG_STATE/pkgs/${p}_"*.deb >/dev/null 2>&1 \
            || die "no ${p}_*.deb in target/debian: build the packages first (make deb)"
        continue
    fi
    if ! cmp -s "$f" "$RIG_STATE/pkgs/${f##*/}"; then
        rm -f "$RIG_STATE/pkgs/${p}_"*.deb
        cp "$f" "$RIG_STATE/pkgs/"
    fi
done
export CHAT_HA_RIG_DEBS=target/rig/pkgs

# --- the box and the dependency .debs (built once, cached)
box=$("$here/box.sh")
recipe=${box##*-}
deps=${box%/*}/deps-${recipe%.box}
for d in haproxy keepalived redis redis-sentinel; do
    [ -d "$deps/$d" ] || die "no dependency .debs in $deps/$d"
done
for d in haproxy keepalived redis redis-sentinel; do
    if ! diff -q <(cd "$deps/$d" && ls) <(cd "$RIG_STATE/debs/$d" 2>/dev/null && ls) >/dev/null; then
        rm -rf "$RIG_STATE/debs/$d" && mkdir -p "$RIG_STATE/debs" && cp -r "$deps/$d" "$RIG_STATE/debs/$d"
    fi
done

# --- bridges and dnsmasq
bridge() { # bridge NAME ADDRESS/24
    local name=$1 addr=$2 other
    if ! ip link show "$name" >/dev/null 2>&1; then
        other=$(ip -o -4 addr show to "${addr%.*}.0/24" | awk '{print $2}' | head -1)
        [ -z "$other" ] || die "${addr%.*}.0/24 is already on $other; set CHAT_HA_RIG_NET / CHAT_HA_RIG_MGMT_NET"
        log "bridge $name $addr/24"
        ip link add "$name" type bridge
    fi
    ip -o -4 addr show dev "$name" | grep -q " $addr/24 " || ip addr add "$addr/24" dev "$name"
    ip link set "$name" up
}
bridge "$RIG_MGMT_BRIDGE" "$RIG_MGMT_NET.1"
bridge "$RIG_BRIDGE" "$RIG_NET.1"

pidfile=$RIG_STATE/dnsmasq.pid
if ! { [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }; then
    log "dnsmasq on $RIG_MGMT_BRIDGE"
    # DNS stays on (no --port=0): the machines' name lookups fail at once
    # instead of waiting for a resolver they cannot reach.
    dnsmasq --strict-order --bind-interfaces --listen-address "$RIG_MGMT_NET.1" \
        --interface="$RIG_MGMT_BRIDGE" --except-interface=lo --no-resolv --no-hosts \
        --dhcp-range "$RIG_MGMT_NET.100,$RIG_MGMT_NET.200" --dhcp-leasefile="$RIG_STATE/dnsmasq.leases" \
        --dhcp-authoritative -u root --pid-file="$pidfile" --log-facility="$RIG_STATE/dnsmasq.log" \
        || die "dnsmasq did not start (see $RIG_STATE/dnsmasq.log)"
fi

# --- the machines
log "vagrant up --provider=lxc ($RIG_MACHINES; Redis layout $RIG_REDIS)"
# What each machine's provisioning said of itself ("provision ROLE: ..."),
# its errors included.
provision_lines() {
    grep -h '^ *[a-z0-9]*: provision [a-z]*:' "$RIG_STATE/vagrant-up.log" | sed 's/^ */rig: /' >&2 || true
}
if ! rig_vagrant up --provider=lxc >"$RIG_STATE/vagrant-up.log" 2>&1; then
    tail -40 "$RIG_STATE/vagrant-up.log" >&2
    # Last, where a short excerpt of the output still shows it: which
    # machine failed, and why.
    provision_lines
    die "vagrant up failed (whole log: $RIG_STATE/vagrant-up.log; tests/rig/down.sh removes the rig)"
fi
provision_lines

# --- both tiers answer through the load balancer, on both domains (the
# public paths: the status endpoints answer only internal networks)
lb=$RIG_NET.10
for host in www.node-services-1.com www.node-services-2.com; do
    for path in /front/lobby '/back/messages?room=lobby'; do
        ok=no
        for _ in $(seq 100); do
            if curl -sf -o /dev/null --max-time 2 -H "Host: $host" "http://$lb$path"; then ok=yes; break; fi
            sleep 0.2
        done
        [ $ok = yes ] || die "http://$lb$path (Host: $host) does not answer"
    done
done
# --- every instance reached Redis (the primary, or the cluster) and logged in (the machines
# came up in parallel: an instance that started before Redis reconnects
# with backoff). Asked from each load balancer: the instances admit no one
# else.
urls=
for addr in $RIG_NET.11 $RIG_NET.12 $RIG_NET.21 $RIG_NET.22; do
    for n in 0 1; do
        case $addr in *.1[0-9]) urls="$urls http://$addr:$((9100 + n))/front/status" ;; *) urls="$urls http://$addr:$((9200 + n))/back/status" ;; esac
    done
done
for machine in lb1 lb2; do
    # shellcheck disable=SC2016  # expanded on the machine
    if ! rig_vagrant ssh "$machine" -c 'for url in '"$urls"'; do
            ok=no
            for _ in $(seq 100); do
                if curl -sf --max-time 2 "$url" | grep -q "\"redis\":\"up\""; then ok=yes; break; fi
                sleep 0.2
            done
            [ $ok = yes ] || { echo "$url does not report Redis up: $(curl -s --max-time 2 "$url")"; exit 1; }
        done' >"$RIG_STATE/redis-up.log" 2>&1; then
        cat "$RIG_STATE/redis-up.log" >&2
        die "not every instance reached Redis (asked from $machine)"
    fi
done
log "up: load balancers lb1, lb2 on the floating address http://$lb/ (Host: www.node-services-1.com or www.node-services-2.com)"
log "machines: tests/rig/vagrant.sh ssh NAME   ($RIG_MACHINES; Redis layout $RIG_REDIS)"
