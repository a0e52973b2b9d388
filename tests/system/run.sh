#!/usr/bin/env bash
# The system tests: the packages of target/debian installed on the rig's
# machines (tests/rig, the Vagrantfile), driven from this host through the
# load balancer with the official socket.io-client.
#
#   tests/system/run.sh                      (make test-system)
#   tests/system/run.sh TEST_FILE...
#   CHAT_HA_RIG_REDIS=cluster tests/system/run.sh tests/system/cluster/*.test.mjs
#
# Without arguments, both Redis layouts in turn: the rig with Sentinel
# (tests/system/*.test.mjs), taken down, then the rig with a Redis Cluster
# (tests/system/cluster/*.test.mjs). With test files, those on the layout
# CHAT_HA_RIG_REDIS names (default sentinel). Brings the rig up if it is not
# (tests/rig/up.sh: builds the box once), runs the files one at a time, and
# takes the rig down at the end (tests/rig/down.sh) unless KEEP_RIG=1 (then
# the last layout's rig stays up). Prints each phase's time.
# Needs root, Node.js 20 and tests/e2e's npm packages (npm ci there).
# shellcheck disable=SC2317  # teardown and report run from the EXIT trap
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"

phase_start=$SECONDS
timings=()
phase() { timings+=("$1: $((SECONDS - phase_start)) s"); phase_start=$SECONDS; }
report() { local t; for t in "${timings[@]}"; do echo "system: $t"; done; }

[ -d tests/e2e/node_modules/socket.io-client ] || (cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error)

teardown() {
    local rc=$?
    if [ "${KEEP_RIG:-0}" = 1 ]; then
        echo "system: KEEP_RIG=1: the rig stays up (tests/rig/down.sh takes it down)"
    else
        phase_start=$SECONDS
        tests/rig/down.sh || rc=1
        phase "rig down"
    fi
    report
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

status=0
# pass LAYOUT TEST_FILE...: the rig of that Redis layout up, the files run.
pass() {
    local layout=$1; shift
    export CHAT_HA_RIG_REDIS=$layout
    # A rig of the other layout (kept up by an earlier KEEP_RIG=1 run) goes first.
    local up
    up=$(cat target/rig/layout 2>/dev/null || true)
    if [ -n "$up" ] && [ "$up" != "$layout" ]; then
        tests/rig/down.sh
        phase "$up: rig down"
    fi
    tests/rig/up.sh
    # The Vagrantfile, for every provider it describes (libvirt and virtualbox
    # cannot boot here, but their branches must be valid).
    tests/rig/vagrant.sh validate
    tests/rig/vagrant.sh validate --ignore-provider
    phase "$layout: rig up (box included)"
    node --test --test-concurrency=1 --test-reporter=spec "$@" || status=1
    phase "$layout: tests"
}

if [ $# -eq 0 ]; then
    pass sentinel tests/system/*.test.mjs
    # The cluster layout's machines take the same names and addresses.
    tests/rig/down.sh
    phase "sentinel: rig down"
    pass cluster tests/system/cluster/*.test.mjs
else
    pass "${CHAT_HA_RIG_REDIS:-sentinel}" "$@"
fi
exit "$status"
