# Shared by the shell test scripts (sourced, not run): check lines as TAP
# prints them, and their tally.
#
#   . "$here/../lib.sh"
#   check "what is checked" COMMAND [ARG...]    # ok or FAIL, and goes on
#   pass "what"; fail "what"                     # the same, decided by the caller
#   checks_done NAME                             # the tally; exits 1 if one failed
# shellcheck shell=bash

failures=0

# pass WHAT: a check that held.
pass() { echo "ok   - $*"; }

# fail WHAT: a check that did not hold; counted, and the script goes on to
# the next, so that one run shows every failure.
fail() { echo "FAIL - $*"; failures=$((failures + 1)); }

# check WHAT COMMAND...: runs COMMAND; passes if it succeeds.
check() {
    local what=$1; shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}

# checks_done NAME: prints the tally; exits 1 if a check failed.
checks_done() {
    if [ "$failures" -ne 0 ]; then
        echo "$1: $failures check(s) failed"
        exit 1
    fi
    echo "$1: all checks passed"
}
