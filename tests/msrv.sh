#!/usr/bin/env bash
# Checks that the minimum Rust version chat-ha states is true:
#   - no crate of Cargo.lock (the patched ones of vendor/ included) declares
#     a rust-version above Cargo.toml's rust-version;
#   - debian/control asks Debian's rustc-web and cargo-web for that version;
#   - the rustc at hand is not older than it (else make lint and the tests
#     would run on a compiler chat-ha says it does not support).
#
# Why not build with that version: this machine has one toolchain (no
# `cargo +VERSION`). A crate's rust-version is the oldest compiler its
# authors support, so the highest among the locked crates is the oldest
# that can build them all. The code's own needs are clippy's: `make lint`
# runs clippy::incompatible_msrv (on by default), which flags any use of
# the standard library newer than Cargo.toml's rust-version.
#
#   tests/msrv.sh
# Needs cargo and jq; reads no network beyond what cargo metadata fetches.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

metadata=$(cargo metadata --format-version 1 --locked)
declared=$(jq -r '.packages[] | select(.name == "chat-ha" and .source == null) | .rust_version // empty' <<<"$metadata")
[ -n "$declared" ] || { echo "msrv: Cargo.toml states no rust-version" >&2; exit 1; }

# Prints "VERSION NAME CRATE_VERSION" for every locked crate that declares
# a rust-version, oldest first.
locked_rust_versions() {
    jq -r '.packages[] | select(.rust_version != null) | "\(.rust_version) \(.name) \(.version)"' <<<"$metadata" | sort -V
}

# shellcheck source=tests/lib.sh
. tests/lib.sh

# Is version $1 newer than version $2?
newer() { [ "$1" != "$2" ] && [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | tail -1)" = "$1" ]; }
# Versions compare with their missing parts as zeros (1.94 = 1.94.0).
full() { local v=$1; while [ "$(tr -cd . <<<"$v" | wc -c)" -lt 2 ]; do v=$v.0; done; echo "$v"; }

highest=$(locked_rust_versions | tail -1)
echo "# Cargo.toml: rust-version $declared; highest of the $(locked_rust_versions | wc -l) locked crates that declare one: $highest"
while read -r version name crate_version; do
    if newer "$(full "$version")" "$(full "$declared")"; then
        fail "$name $crate_version needs Rust $version, above Cargo.toml's $declared"
    fi
done < <(locked_rust_versions)

for package in rustc-web cargo-web; do
    grep -q "^ *$package (>= $declared)" debian/control ||
        fail "debian/control does not Build-Depend on $package (>= $declared)"
done

rustc_version=$(rustc --version | cut -d' ' -f2)
if newer "$(full "$declared")" "$(full "$rustc_version")"; then
    fail "rustc here is $rustc_version, older than Cargo.toml's $declared"
fi

checks_done msrv
echo "msrv: Rust $declared builds every locked crate; debian/control agrees"
