#!/usr/bin/env bash
# Builds (once) the vagrant-lxc box the rig's machines boot, a Debian 12 root
# with systemd, sshd and sudo, and the .debs of the Debian packages the
# rig's machines install besides the chat-ha packages (haproxy, keepalived,
# redis-server, redis-sentinel and their libraries), which the machines,
# having no route to a mirror, install from files.
# Registers the box with Vagrant when it is not.
#
#   tests/rig/box.sh
#
# Cache (kept between runs): $CHAT_HA_RIG_CACHE, default /var/cache/chat-ha-rig
#   bookworm-lxc-rN.box   the box file
#   deps-rN/{haproxy,keepalived,redis,redis-sentinel}/*.deb
# Rebuilt only when missing or when the recipe below changes. Needs root,
# debootstrap and the Debian mirror for a build; nothing for a cached box.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/rig/common.sh
. "$here/common.sh"

# Bump to rebuild the cache when the recipe below changes.
recipe=2
box_file=$RIG_CACHE/bookworm-lxc-r$recipe.box
deps=$RIG_CACHE/deps-r$recipe
include=systemd,systemd-sysv,dbus,iproute2,procps,openssh-server,sudo,curl,socat,less
# Each into deps-rN/NAME (redis-server into redis), with its dependencies.
dep_packages=(haproxy keepalived redis-server redis-sentinel)
vagrant_key=/usr/share/rubygems-integration/all/gems/vagrant-2.3.4/keys/vagrant.pub

host_mirror() {
    { sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null
      sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\)[[:space:]]\+bookworm[[:space:]].*/\2/p' \
          /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null
    } | grep -v security | head -1 || true
}

build() {
    need_root
    command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
    local mirror key work root
    mirror=${CHAT_HA_MIRROR:-$(host_mirror)}
    [ -n "$mirror" ] || die "no Debian mirror in /etc/apt; set CHAT_HA_MIRROR"
    key=$vagrant_key
    [ -f "$key" ] || key=$(find /usr/share/rubygems-integration/all/gems -path '*/vagrant-*/keys/vagrant.pub' 2>/dev/null | head -1)
    [ -f "$key" ] || die "Vagrant's insecure public key not found (apt-get install vagrant)"

    mkdir -p "$RIG_CACHE"
    work=$(mktemp -d "$RIG_CACHE/build.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    root=$work/rootfs
    log "debootstrap bookworm (about a minute; log: $RIG_CACHE/debootstrap.log)"
    debootstrap --variant=minbase --include="$include" bookworm "$root" "$mirror" \
        >"$RIG_CACHE/debootstrap.log" 2>&1 || { tail -20 "$RIG_CACHE/debootstrap.log" >&2; die "debootstrap failed"; }

    log "downloading ${dep_packages[*]} and their dependencies"
    printf 'deb %s bookworm main\n' "$mirror" >"$root/etc/apt/sources.list"
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    chroot "$root" apt-get clean
    chroot "$root" apt-get update -qq
    mkdir -p "$work/deps"
    for p in "${dep_packages[@]}"; do
        chroot "$root" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --download-only --no-install-recommends "$p" >/dev/null
        mkdir -p "$work/deps/${p%-server}"
        mv "$root"/var/cache/apt/archives/*.deb "$work/deps/${p%-server}/"
    done
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*

    log "configuring the root"
    # Each machine takes its own name, machine id and ssh host keys.
    rm -f "$root/etc/hostname" "$root"/etc/ssh/ssh_host_*
    : >"$root/etc/machine-id"
    mkdir -p "$root/etc/systemd/system/ssh.service.d"
    cat >"$root/etc/systemd/system/ssh.service.d/host-keys.conf" <<'EOF'
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
EOF
    # The resolver is the rig's dnsmasq: a name it does not know fails at once.
    printf 'nameserver %s.1\noptions timeout:1 attempts:1\n' "$RIG_MGMT_NET" >"$root/etc/resolv.conf"
    # eth0 (the management bridge) by DHCP; eth1 keeps the address LXC gives it.
    cat >"$root/etc/systemd/network/10-eth0.network" <<'EOF'
[Match]
Name=eth0

[Network]
DHCP=ipv4
EOF
    chroot "$root" systemctl enable systemd-networkd.service >/dev/null 2>&1
    chroot "$root" useradd -m -s /bin/bash vagrant
    echo 'vagrant ALL=(ALL) NOPASSWD:ALL' >"$root/etc/sudoers.d/vagrant"
    chmod 0440 "$root/etc/sudoers.d/vagrant"
    install -d -m 0700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
    install -m 0600 -o 1000 -g 1000 "$key" "$root/home/vagrant/.ssh/authorized_keys"
    # Shorter than the 90 s default: a machine that hangs stopping a unit
    # does not hold up `vagrant destroy`.
    mkdir -p "$root/etc/systemd/system.conf.d"
    printf '[Manager]\nDefaultTimeoutStopSec=15s\n' >"$root/etc/systemd/system.conf.d/rig.conf"

    log "packing the box"
    mkdir -p "$work/box"
    tar -C "$work" --numeric-owner -czf "$work/box/rootfs.tar.gz" ./rootfs
    printf '{"provider":"lxc","version":"1.0.0","built-on":"%s","template-opts":{}}\n' "$(date -u +%FT%TZ)" \
        >"$work/box/metadata.json"
    printf 'lxc.include = /usr/share/lxc/config/debian.common.conf\nlxc.arch = x86_64\nlxc.apparmor.profile = unconfined\n' \
        >"$work/box/lxc-config"
    tar -C "$work/box" -cf "$work/box.box" metadata.json lxc-config rootfs.tar.gz
    rm -rf "$deps"
    mv "$work/deps" "$deps"
    mv "$work/box.box" "$box_file"
    rm -rf "$work"
    trap - EXIT
    # Older recipes' files.
    find "$RIG_CACHE" -maxdepth 1 \( -name 'bookworm-lxc-r*.box' ! -name "${box_file##*/}" \
        -o -name 'deps-r*' ! -name "${deps##*/}" \) -exec rm -rf {} +
}

rebuilt=no
deps_complete() {
    local p
    for p in "${dep_packages[@]}"; do [ -d "$deps/${p%-server}" ] || return 1; done
}
if [ ! -s "$box_file" ] || ! deps_complete; then
    build
    rebuilt=yes
fi
command -v vagrant >/dev/null || die "vagrant is missing (tests/rig/up.sh installs it, or apt-get install vagrant vagrant-lxc)"
if [ $rebuilt = yes ] || ! vagrant box list 2>/dev/null | grep -q "^$RIG_BOX "; then
    log "vagrant box add $RIG_BOX"
    vagrant box add --force --name "$RIG_BOX" "$box_file" >/dev/null
fi
echo "$box_file"
