# Shared by the rig's scripts (sourced, not run). Names and addresses of the
# rig; the Vagrantfile and tests/system/lib/rig.mjs use the same defaults.
# shellcheck shell=bash disable=SC2034

RIG_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# Machine-wide cache: the box file and the dependency .debs.
RIG_CACHE=${CHAT_HA_RIG_CACHE:-/var/cache/chat-ha-rig}
# What the rig creates in the tree (removed by down.sh): Vagrant's machine
# state, dnsmasq's files, the packages the machines install.
RIG_STATE=$RIG_REPO/target/rig
RIG_BOX=${CHAT_HA_RIG_BOX:-chat-ha/bookworm-lxc}
# Management bridge (eth0, DHCP from the rig's dnsmasq) and rig bridge
# (eth1, fixed addresses: the machines talk to each other and the host
# reaches them there). The Vagrantfile names the same bridges.
RIG_MGMT_BRIDGE=chatha0
RIG_MGMT_NET=${CHAT_HA_RIG_MGMT_NET:-10.78.0}
RIG_BRIDGE=chatha1
RIG_NET=${CHAT_HA_RIG_NET:-10.78.1}
# The Redis layout (the Vagrantfile reads the same variable): sentinel,
# redis1..3 with Sentinel; or cluster, redis1..6 a Redis Cluster.
RIG_REDIS=${CHAT_HA_RIG_REDIS:-sentinel}
case $RIG_REDIS in
sentinel) RIG_REDIS_MACHINES="redis1 redis2 redis3" ;;
cluster) RIG_REDIS_MACHINES="redis1 redis2 redis3 redis4 redis5 redis6" ;;
*) echo "rig: error: CHAT_HA_RIG_REDIS=$RIG_REDIS: use sentinel or cluster" >&2; exit 1 ;;
esac
export CHAT_HA_RIG_REDIS=$RIG_REDIS
RIG_MACHINES="$RIG_REDIS_MACHINES back1 back2 front1 front2 lb1 lb2"
# The layout of the rig that is up, written by up.sh.
RIG_LAYOUT_FILE=$RIG_STATE/layout

# Vagrant keeps its machine state under target/rig, not in the tree.
export VAGRANT_DOTFILE_PATH=$RIG_STATE/vagrant
export VAGRANT_CHECKPOINT_DISABLE=1
export VAGRANT_DEFAULT_PROVIDER=lxc

log() { echo "rig: $*" >&2; }
die() { echo "rig: error: $*" >&2; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "needs root (LXC containers, bridges, dnsmasq)"; }
# Vagrant, run from the repository (where the Vagrantfile is).
rig_vagrant() { (cd "$RIG_REPO" && vagrant "$@"); }
