#!/usr/bin/env bash
# Builds (once) the cached Debian 12 root that install-test.sh boots, and the
# .debs of the packages' Debian dependencies (haproxy, redis-server and their
# libraries), which the containers, having no network, install from files.
#
#   tests/packaging/prepare-root.sh [CACHE_DIR]   (default /var/cache/chat-ha-packaging)
#
# Rebuilds from nothing when CACHE_DIR is empty or stale; needs debootstrap
# and the Debian mirror. Prints the cache directory's path on success.
set -euo pipefail

cache=${1:-/var/cache/chat-ha-packaging}
# The Debian mirror this machine's apt uses (CHAT_HA_MIRROR overrides it).
host_mirror() {
    { sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null
      sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\)[[:space:]]\+bookworm[[:space:]].*/\2/p' \
          /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null
    } | grep -v security | head -1 || true
}
mirror=${CHAT_HA_MIRROR:-$(host_mirror)}
[ -n "$mirror" ] || { echo "prepare-root: no Debian mirror in /etc/apt; set CHAT_HA_MIRROR" >&2; exit 1; }
root=$cache/root
debs=$cache/debs
# Bump to rebuild the cache when the recipe below changes.
recipe=5
# Packages in the root: systemd to boot, curl to test, procps for haproxy's reload.
include=systemd,systemd-sysv,dbus,iproute2,procps,curl,ca-certificates
# Dependencies the chat-ha packages pull from Debian.
deps="haproxy keepalived redis-server"

if [ -f "$cache/ready" ] && [ "$(cat "$cache/ready")" = "$recipe" ]; then
    echo "$cache"
    exit 0
fi

command -v debootstrap >/dev/null || { echo "prepare-root: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
mkdir -p "$cache"
rm -rf "$root.new" "$debs.new" "$cache/ready"
echo "prepare-root: debootstrap bookworm into $root (about a minute)" >&2
debootstrap --variant=minbase --include="$include" bookworm "$root.new" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
# Each container takes its machine name as host name.
rm -f "$root.new/etc/hostname"
: >"$root.new/etc/machine-id"

# Download (not install) the dependencies with the root's own apt, so the set
# is exactly what the root lacks.
echo "prepare-root: downloading $deps and their dependencies" >&2
mkdir -p "$debs.new"
printf 'deb %s bookworm main\n' "$mirror" >"$root.new/etc/apt/sources.list"
cp /etc/resolv.conf "$root.new/etc/resolv.conf"
chroot "$root.new" apt-get clean   # debootstrap leaves its own .debs there
chroot "$root.new" apt-get update -qq >&2
# shellcheck disable=SC2086
chroot "$root.new" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --download-only --no-install-recommends $deps >&2
mv "$root.new"/var/cache/apt/archives/*.deb "$debs.new/"
chroot "$root.new" apt-get clean
rm -rf "$root.new"/var/lib/apt/lists/*
: >"$root.new/etc/apt/sources.list"
printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' >"$root.new/etc/resolv.conf"

rm -rf "$root" "$debs"
mv "$root.new" "$root"
mv "$debs.new" "$debs"
echo "$recipe" >"$cache/ready"
echo "$cache"
