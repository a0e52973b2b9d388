#!/usr/bin/env bash
# Removes everything tests/rig/up.sh created, in either Redis layout
# (CHAT_HA_RIG_REDIS does not matter here): the machines (vagrant destroy,
# then any container chat-ha-rig-* left over), the rig's dnsmasq, the bridges
# chatha0 and chatha1, the box registration and target/rig/. Keeps the cache
# (the box file and dependency .debs in /var/cache/chat-ha-rig).
# Idempotent; exits non-zero if something could not be removed.
#
#   tests/rig/down.sh          (make rig-down)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/rig/common.sh
. "$here/common.sh"
need_root
failed=

# The machines hold nothing to keep: stop them all at once, without a
# shutdown (vagrant destroy would halt them one after the other).
if command -v lxc-ls >/dev/null; then
    for c in $(lxc-ls -1 --running 2>/dev/null | grep '^chat-ha-rig-' || true); do
        lxc-stop -k -n "$c" >/dev/null 2>&1 &
    done
    wait
fi
if [ -d "$VAGRANT_DOTFILE_PATH/machines" ] && command -v vagrant >/dev/null; then
    log "vagrant destroy -f"
    # The cluster layout's machines include the Sentinel layout's: every
    # machine of either is destroyed (those never created are skipped).
    CHAT_HA_RIG_REDIS=cluster rig_vagrant destroy -f >"$RIG_STATE/vagrant-destroy.log" 2>&1 \
        || { tail -20 "$RIG_STATE/vagrant-destroy.log" >&2; log "vagrant destroy failed; removing the containers directly"; }
fi
if command -v lxc-ls >/dev/null; then
    for c in $(lxc-ls -1 2>/dev/null | grep '^chat-ha-rig-' || true); do
        log "removing leftover container $c"
        lxc-stop -k -n "$c" >/dev/null 2>&1 || true
        lxc-destroy -n "$c" >/dev/null 2>&1 || failed="$failed container:$c"
    done
fi

pidfile=$RIG_STATE/dnsmasq.pid
if [ -s "$pidfile" ]; then
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null && grep -q dnsmasq "/proc/$pid/comm" 2>/dev/null; then
        log "stopping dnsmasq ($pid)"
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && failed="$failed dnsmasq:$pid"
    fi
fi

for br in "$RIG_BRIDGE" "$RIG_MGMT_BRIDGE"; do
    if ip link show "$br" >/dev/null 2>&1; then
        log "deleting bridge $br"
        ip link del "$br" || failed="$failed bridge:$br"
    fi
done

if command -v vagrant >/dev/null && vagrant box list 2>/dev/null | grep -q "^$RIG_BOX "; then
    log "vagrant box remove $RIG_BOX"
    vagrant box remove --force --all "$RIG_BOX" >/dev/null 2>&1 || failed="$failed box:$RIG_BOX"
fi

if [ -z "$failed" ]; then
    rm -rf "$RIG_STATE"
    log "down"
else
    die "could not remove:$failed (state kept in $RIG_STATE)"
fi
