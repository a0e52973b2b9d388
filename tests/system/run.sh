#!/usr/bin/env bash
# The system tests: the packages of target/debian installed on nine machines
# (tests/rig, the Vagrantfile), driven from this host through the load
# balancer with the official socket.io-client.
#
#   tests/system/run.sh [TEST_FILE...]       (make test-system)
#
# Brings the rig up if it is not (tests/rig/up.sh: builds the box once), runs
# tests/system/*.test.mjs one file at a time, and takes the rig down at the
# end (tests/rig/down.sh) unless KEEP_RIG=1. Prints each phase's time.
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

tests/rig/up.sh
# The Vagrantfile, for every provider it describes (libvirt and virtualbox
# cannot boot here, but their branches must be valid).
tests/rig/vagrant.sh validate
tests/rig/vagrant.sh validate --ignore-provider
phase "rig up (box included)"

if [ $# -eq 0 ]; then set -- tests/system/*.test.mjs; fi
status=0
node --test --test-concurrency=1 --test-reporter=spec "$@" || status=$?
phase "tests"
exit "$status"
