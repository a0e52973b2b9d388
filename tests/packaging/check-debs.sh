#!/usr/bin/env bash
# Checks the built Debian packages (it builds nothing):
#   - lintian reports no error and no warning,
#   - each package holds the files, conffiles and dependencies it should,
#     and no file is in two packages,
#   - the daemons' copyright has a paragraph for every crate of Cargo.lock,
#     and names the Socket.IO client that chat-frontend ships (minified and
#     not),
#   - chat-frontend and chat-backend have one set of maintainer scripts,
#   - the packaged binaries run and accept the packaged configuration,
#   - the packaged units and generator are the ones in systemd/.
#
#   tests/packaging/check-debs.sh DIR_OR_DEBS...
# e.g. tests/packaging/check-debs.sh target/debian
# Needs lintian, dpkg-dev (dpkg-deb) and man-db.
# The checks are strings that `check ... eval` expands later, on purpose.
# shellcheck disable=SC2016,SC2012
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: $0 DIR_OR_DEBS..." >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck disable=SC2034  # used by the eval'd checks
repo=$(cd "$here/../.." && pwd)

debs=()
for arg in "$@"; do
    if [ -d "$arg" ]; then
        for f in "$arg"/*.deb; do [ -e "$f" ] && debs+=("$f"); done
    else
        debs+=("$arg")
    fi
done

# pass, fail, check, checks_done
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$here/../lib.sh"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

packages="chat-ha chat-ha-common chat-frontend chat-backend chat-haproxy chat-keepalived chat-redis"
declare -A deb
for p in $packages; do
    found=()
    for f in "${debs[@]}"; do
        [ "$(dpkg-deb -f "$f" Package)" = "$p" ] && found+=("$f")
    done
    if [ ${#found[@]} -ne 1 ]; then
        echo "FAIL - expected one $p .deb, found ${#found[@]} in: $*"
        exit 1
    fi
    deb[$p]=${found[0]}
    dpkg-deb -x "${found[0]}" "$tmp/$p"
    dpkg-deb -e "${found[0]}" "$tmp/$p/DEBIAN"
done
version=$(dpkg-deb -f "${deb[chat-ha]}" Version)
echo "# packages $version: $(for p in $packages; do basename "${deb[$p]}"; done | tr '\n' ' ')"

echo "# lintian"
lintian_out=$tmp/lintian.txt
lintian --display-info "${deb[@]}" >"$lintian_out" 2>&1 || true
sed 's/^/     /' "$lintian_out"
errors=$(grep -c '^E: ' "$lintian_out" || true)
warnings=$(grep -c '^W: ' "$lintian_out" || true)
check "lintian: $errors errors, $warnings warnings" test "$errors" -eq 0 -a "$warnings" -eq 0
check "lintian --fail-on error,warning passes" lintian --fail-on error,warning -q "${deb[@]}"

echo "# contents"
has_file() { # has_file PACKAGE PATH [MODE]
    local f=$tmp/$1$2
    [ -f "$f" ] || { echo "     $1 lacks $2"; return 1; }
    if [ -n "${3:-}" ] && [ "$(stat -c %a "$f")" != "$3" ]; then
        echo "     $1: $2 has mode $(stat -c %a "$f"), expected $3"; return 1
    fi
}
conffile() { grep -qx "$2" "$tmp/$1/DEBIAN/conffiles" 2>/dev/null || { echo "     $1: $2 is not a conffile"; return 1; }; }
depends() { # depends PACKAGE REGEX
    dpkg-deb -f "${deb[$1]}" Depends | tr ',' '\n' | sed 's/^ *//' | grep -qx -- "$2" \
        || { echo "     $1 does not depend on $2"; return 1; }
}
same() { cmp -s "$1" "$2" || { echo "     $1 differs from $2"; return 1; }; }
# Are maintainer script $1 of chat-frontend and chat-backend the same but
# for the package's name?
same_script_but_name() {
    cmp -s <(sed s/chat-frontend/PACKAGE/g "$tmp/chat-frontend/DEBIAN/$1") \
        <(sed s/chat-backend/PACKAGE/g "$tmp/chat-backend/DEBIAN/$1") ||
        { echo "     DEBIAN/$1 of chat-frontend and chat-backend differ"; return 1; }
}
# Prints "NAME VERSION" for each crates.io crate of Cargo.lock.
locked_registry_crates() {
    awk '/^\[\[package\]\]/ {n = v = ""} /^name = / {n = $3} /^version = / {v = $3}
         /^source = "registry/ {print n, v}' "$repo/Cargo.lock" | tr -d '"'
}
# Prints the name of each crate of Cargo.lock that has a path of this
# repository's vendor/ as its source (neither crates.io nor the workspace's).
locked_vendor_crates() {
    awk 'function flush() { if (n != "" && s == "") print n; n = s = "" }
         /^\[\[package\]\]/ {flush()} /^name = / {n = $3} /^source = / {s = $3} END {flush()}' "$repo/Cargo.lock" |
        tr -d '"' | grep -vx -e chat-ha -e chat-bench
}
# Has copyright file $1 a paragraph for every crate of Cargo.lock?
covers_locked_crates() {
    local name version missing=0
    while read -r name version; do
        grep -qxF "Files: debian/cargo-vendor/$name-$version/*" "$1" ||
            { echo "     no paragraph for $name $version"; missing=$((missing + 1)); }
    done < <(locked_registry_crates)
    while read -r name; do
        grep -qxE "Files: vendor/(.+/)?$name/\*" "$1" ||
            { echo "     no paragraph for vendor/ $name"; missing=$((missing + 1)); }
    done < <(locked_vendor_crates)
    [ "$missing" -eq 0 ] && [ "$(locked_registry_crates | wc -l)" -gt 0 ]
}

for d in frontend backend; do
    p=chat-$d
    check "$p: /usr/bin/$p (755), its units, its man page" eval \
        'has_file $p /usr/bin/$p 755 && has_file $p /lib/systemd/system/$p@.service 644 &&
         has_file $p /lib/systemd/system/$p@.socket 644 && has_file $p /usr/share/man/man8/$p.8.gz'
    check "$p: units are systemd/$p@.{service,socket}" eval \
        'same $tmp/$p/lib/systemd/system/$p@.service $repo/systemd/$p@.service &&
         same $tmp/$p/lib/systemd/system/$p@.socket $repo/systemd/$p@.socket'
    check "$p: depends on chat-ha-common (= $version)" depends $p "chat-ha-common (= $version)"
    check "$p: --version says $version" eval '"$tmp/$p/usr/bin/$p" --version | grep -qw "$version"'
    check "$p: accepts the packaged configuration" \
        eval '"$tmp/$p/usr/bin/$p" --check-config --config "$tmp/chat-ha-common/etc/chat-ha/chat-ha.toml" >/dev/null'
    check "$p: full RELRO (BIND_NOW)" eval 'readelf -d "$tmp/$p/usr/bin/$p" | grep -q "BIND_NOW"'
    check "$p: man page renders without warnings" eval \
        '[ -z "$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -E UTF-8 -l -Tutf8 -Z "$tmp/$p/usr/share/man/man8/$p.8.gz" 2>&1 >/dev/null)" ]'
    check "$p: maintainer scripts stop its instances on remove, restart them one by one on upgrade" eval \
        'grep -q "stop .$p@\*.socket. .$p@\*.service." "$tmp/$p/DEBIAN/prerm" &&
         grep -q "state=active .$p@\*.service." "$tmp/$p/DEBIAN/postinst" &&
         grep -q "deb-systemd-invoke restart" "$tmp/$p/DEBIAN/postinst" &&
         ! grep -q "#PACKAGE#" "$tmp/$p/DEBIAN/postinst" "$tmp/$p/DEBIAN/prerm"'
    check "$p: its copyright has a paragraph for every crate of Cargo.lock" \
        covers_locked_crates "$tmp/$p/usr/share/doc/$p/copyright"
done
check "chat-frontend and chat-backend: the same maintainer scripts but for the package's name" eval \
    'same_script_but_name postinst && same_script_but_name prerm && same_script_but_name postrm'
check "chat-frontend: the www directory (page, script, Socket.IO client and its source)" eval \
    'has_file chat-frontend /usr/share/chat-ha/www/index.html && has_file chat-frontend /usr/share/chat-ha/www/assets/app.js &&
     has_file chat-frontend /usr/share/chat-ha/www/assets/socket.io.min.js && has_file chat-frontend /usr/share/chat-ha/www/assets/socket.io.js'
www=$tmp/chat-frontend/usr/share/chat-ha/www/assets
socket_io=$(sed -n 's/^Comment: The Socket.IO browser client, version \([0-9.]*\):.*/\1/p' "$tmp/chat-frontend/usr/share/doc/chat-frontend/copyright")
check "chat-frontend: socket.io.min.js and socket.io.js are the Socket.IO client its copyright names (${socket_io:-none})" eval \
    '[ -n "$socket_io" ] && [ "$(sed -n 2p "$www/socket.io.min.js")" = " * Socket.IO v$socket_io" ] &&
     [ "$(sed -n 2p "$www/socket.io.js")" = " * Socket.IO v$socket_io" ]'

p=chat-ha-common
check "$p: /etc/chat-ha/chat-ha.toml is a conffile, equal to etc/chat-ha/chat-ha.toml" eval \
    'conffile $p /etc/chat-ha/chat-ha.toml && same $tmp/$p/etc/chat-ha/chat-ha.toml $repo/etc/chat-ha/chat-ha.toml'
check "$p: chat-ha.target, chat-ha.slice and the generator (755, equal to systemd/)" eval \
    'has_file $p /lib/systemd/system/chat-ha.target 644 && same $tmp/$p/lib/systemd/system/chat-ha.slice $repo/systemd/chat-ha.slice &&
     has_file $p /usr/lib/systemd/system-generators/chat-ha-generator 755 &&
     same $tmp/$p/usr/lib/systemd/system-generators/chat-ha-generator $repo/systemd/chat-ha-generator &&
     same $tmp/$p/lib/systemd/system/chat-ha.target $repo/systemd/chat-ha.target'
check "$p: postinst enables and starts chat-ha.target" eval \
    'grep -q "deb-systemd-helper enable .chat-ha.target." $tmp/$p/DEBIAN/postinst &&
     grep -q "deb-systemd-invoke start .chat-ha.target." $tmp/$p/DEBIAN/postinst'
check "$p: prerm stops chat-ha.target on remove only" eval \
    'grep -q "\"\$1\" = remove" $tmp/$p/DEBIAN/prerm && grep -q "deb-systemd-invoke stop .chat-ha.target." $tmp/$p/DEBIAN/prerm'
check "$p: postinst creates /etc/chat-ha/redis-password and sentinel-password (0600, empty) when missing" eval \
    'grep -q "install -m 600 /dev/null /etc/chat-ha/redis-password" $tmp/$p/DEBIAN/postinst &&
     grep -q "install -m 600 /dev/null /etc/chat-ha/sentinel-password" $tmp/$p/DEBIAN/postinst'
check "$p: postrm purges chat-ha.target's state" eval 'grep -q "deb-systemd-helper purge .chat-ha.target." $tmp/$p/DEBIAN/postrm'

p=chat-haproxy
check "$p: /etc/haproxy/chat-ha.cfg and its lists of domains, origins, internal networks and servers are conffiles" eval \
    'conffile $p /etc/haproxy/chat-ha.cfg && conffile $p /etc/haproxy/chat-ha-domains.lst &&
     conffile $p /etc/haproxy/chat-ha-origins.lst && conffile $p /etc/haproxy/chat-ha-internal.lst &&
     conffile $p /etc/haproxy/chat-ha-servers.lst'
check "$p: haproxy.service drop-in writes /etc/haproxy/chat-ha.cfg with its servers (chat-ha-servers, 755) and loads that" eval \
    'has_file $p /usr/lib/chat-haproxy/chat-ha-servers 755 &&
     grep -q "^ExecStartPre=/usr/lib/chat-haproxy/chat-ha-servers /etc/haproxy/chat-ha-servers.lst /etc/haproxy/chat-ha.cfg /run/chat-haproxy/chat-ha.cfg$" $tmp/$p/lib/systemd/system/haproxy.service.d/chat-ha.conf &&
     grep -q "^ExecStart=/usr/sbin/haproxy .*-f /run/chat-haproxy/chat-ha.cfg" $tmp/$p/lib/systemd/system/haproxy.service.d/chat-ha.conf'
check "$p: depends on haproxy" depends $p haproxy
if command -v haproxy >/dev/null; then
    check "$p: haproxy -c accepts chat-ha.cfg after Debian's haproxy.cfg" eval \
        'sed "s#/etc/haproxy/chat-ha-\(domains\|origins\|internal\)\.lst#$tmp/$p/etc/haproxy/chat-ha-\1.lst#" $tmp/$p/etc/haproxy/chat-ha.cfg >$tmp/chat-ha.cfg &&
         haproxy -c -q -f /etc/haproxy/haproxy.cfg -f $tmp/chat-ha.cfg'
fi

p=chat-redis
check "$p: /etc/redis/chat-ha.conf is a conffile, equal to etc/redis/chat-ha.conf, including Debian's first" eval \
    'conffile $p /etc/redis/chat-ha.conf && same $tmp/$p/etc/redis/chat-ha.conf $repo/etc/redis/chat-ha.conf &&
     [ "$(grep -v "^#" $tmp/$p/etc/redis/chat-ha.conf | grep -m1 .)" = "include /etc/redis/redis.conf" ]'
check "$p: the rules of the users chat-ha, replica and sentinel, equal to etc/redis/" eval \
    'same $tmp/$p/usr/share/chat-redis/chat-ha-user.acl $repo/etc/redis/chat-ha-user.acl &&
     same $tmp/$p/usr/share/chat-redis/chat-ha-sentinel-users.acl $repo/etc/redis/chat-ha-sentinel-users.acl'
check "$p: redis-server.service drop-in runs redis-server /etc/redis/chat-ha.conf, equal to systemd/" eval \
    'same $tmp/$p/lib/systemd/system/redis-server.service.d/chat-ha.conf $repo/systemd/redis-server.service.d/chat-ha.conf &&
     grep -qx "ExecStart=" $tmp/$p/lib/systemd/system/redis-server.service.d/chat-ha.conf &&
     grep -qx "ExecStart=/usr/bin/redis-server /etc/redis/chat-ha.conf --supervised systemd --daemonize no" \
         $tmp/$p/lib/systemd/system/redis-server.service.d/chat-ha.conf'
check "$p: /etc/redis/chat-ha-cluster.conf is a conffile, equal to etc/redis/, with cluster mode on" eval \
    'conffile $p /etc/redis/chat-ha-cluster.conf && same $tmp/$p/etc/redis/chat-ha-cluster.conf $repo/etc/redis/chat-ha-cluster.conf &&
     grep -qx "cluster-enabled yes" $tmp/$p/etc/redis/chat-ha-cluster.conf'
check "$p: depends on redis-server (>= 5:6.2)" depends $p "redis-server (>= 5:6.2)"
check "$p: the ACL file is not shipped (postinst writes it)" test ! -e "$tmp/$p/etc/redis/chat-ha-users.acl"

p=chat-keepalived
check "$p: drop-ins for keepalived.service and haproxy.service, equal to debian/keepalived-dropin/" eval \
    'same $tmp/$p/lib/systemd/system/keepalived.service.d/chat-ha.conf $repo/debian/keepalived-dropin/keepalived.service.d/chat-ha.conf &&
     same $tmp/$p/lib/systemd/system/haproxy.service.d/chat-keepalived.conf $repo/debian/keepalived-dropin/haproxy.service.d/chat-keepalived.conf'
check "$p: /run/chat-keepalived/haproxy-down made at boot, saying down (1)" eval \
    'grep -q "^f /run/chat-keepalived/haproxy-down 0644 root root - 1\$" $tmp/$p/usr/lib/tmpfiles.d/chat-keepalived.conf'
check "$p: the example keepalived.conf, equal to etc/keepalived/" eval \
    'same $tmp/$p/usr/share/doc/$p/examples/keepalived.conf.example $repo/etc/keepalived/keepalived.conf.example'
for dep in "chat-haproxy (= $version)" keepalived; do
    check "$p: depends on $dep" depends $p "$dep"
done

p=chat-ha
for dep in "chat-frontend (= $version)" "chat-backend (= $version)" "chat-haproxy (= $version)" "chat-redis (= $version)"; do
    check "$p: depends on $dep" depends $p "$dep"
done
check "$p: does not depend on redis-server directly" eval '! depends $p redis-server >/dev/null'

dups=$(for p in $packages; do (cd "$tmp/$p" && find . -path ./DEBIAN -prune -o ! -type d -print); done | sort | uniq -d)
[ -z "$dups" ] || printf '%s\n' "$dups" | sed 's/^/     in two packages: /'
check "no file is in two packages" test -z "$dups"

checks_done check-debs
