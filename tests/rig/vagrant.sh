#!/usr/bin/env bash
# Vagrant on the rig's machines, with the rig's state directory:
#   tests/rig/vagrant.sh status | ssh lb1 | ssh front1 -c 'systemctl status chat-ha.target' ...
# The Redis layout is the rig's that is up (tests/rig/up.sh recorded it),
# unless CHAT_HA_RIG_REDIS names one.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
layout_file=$here/../../target/rig/layout
if [ -z "${CHAT_HA_RIG_REDIS:-}" ] && [ -s "$layout_file" ]; then
    CHAT_HA_RIG_REDIS=$(cat "$layout_file")
    export CHAT_HA_RIG_REDIS
fi
# shellcheck source=tests/rig/common.sh
. "$here/common.sh"
export CHAT_HA_RIG_DEBS=target/rig/pkgs
cd "$RIG_REPO"
exec vagrant "$@"
