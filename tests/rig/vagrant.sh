#!/usr/bin/env bash
# Vagrant on the rig's machines, with the rig's state directory:
#   tests/rig/vagrant.sh status | ssh lb1 | ssh front1 -c 'systemctl status chat-ha.target' ...
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/rig/common.sh
. "$here/common.sh"
export CHAT_HA_RIG_DEBS=target/rig/pkgs
cd "$RIG_REPO"
exec vagrant "$@"
