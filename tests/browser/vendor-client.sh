#!/bin/sh
# Re-copies the Socket.IO client bundle that the chat page loads from
# share/www/assets/, taken from the exact version pinned in package-lock.json.
#
#   cd tests/browser && npm ci && sh vendor-client.sh
#
# To move to another 4.8.x release: change the pin in package.json, run
# `npm install`, then this script, and commit package*.json with the assets.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
pkg="$here/node_modules/socket.io-client"
dest="$here/../../share/www/assets"
if [ ! -f "$pkg/dist/socket.io.min.js" ]; then
  echo "vendor-client.sh: $pkg is missing; run 'npm ci' in tests/browser first" >&2
  exit 1
fi
version=$(node -p "require('$pkg/package.json').version")
cp "$pkg/dist/socket.io.min.js" "$dest/socket.io.min.js"
cp "$pkg/LICENSE" "$dest/socket.io-client.LICENSE"
echo "copied socket.io-client $version into share/www/assets/"
