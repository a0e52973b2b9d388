#!/usr/bin/env bash
# Provisions one machine of the Vagrantfile's topology (run inside it, as
# root, by Vagrant's shell provisioner; safe to run again).
#
# Environment (set by the Vagrantfile):
#   ROLE       redis | backend | frontend | lb
#   REDIS_LAYOUT  sentinel (default): the redis machines run a primary,
#              its replicas and a Sentinel each; cluster: they are the
#              nodes of a Redis Cluster, three primaries with a replica
#              each, made by the last one's provisioning
#   DEBS       folder of the chat-ha .debs (/vagrant/target/debian)
#   DEPS       folder of pre-downloaded dependency .debs, DEPS/haproxy and
#              DEPS/redis; when missing, apt fetches them from the mirror
#   ADDRESS    this machine's address on the rig network
#   REDIS_HOSTS  the redis machines' addresses: each runs Redis (and,
#              in the sentinel layout, Sentinel)
#   REDIS_PRIMARY  in the sentinel layout, the one whose Redis is the
#              primary at the start
#   LBS        the load balancers' addresses: the addresses (with loopback)
#              the instances admit
#   FLOATING_ADDRESS  the address keepalived gives one load balancer
#   PRIORITY   on lb: its VRRP priority (the higher one takes the floating
#              address first)
#   REDIS_PASSWORD_FILE  the rig's Redis password (made once per rig on the
#              host, see the Vagrantfile): installed as
#              /etc/chat-ha/redis-password on the redis machines and every
#              frontend and backend host, before the packages
#   REDIS_ADMIN_PASSWORD_FILE, REPLICA_PASSWORD_FILE,
#   SENTINEL_USER_PASSWORD_FILE  the rig's passwords of the Redis users
#              admin, replica and sentinel: installed as
#              /etc/redis/admin-password, replica-password and
#              sentinel-user-password on the redis machines, before the
#              packages; replicas log in to the primary as replica,
#              Sentinels to each server as sentinel
#   SENTINEL_PASSWORD_FILE  the Sentinels' own password (requirepass):
#              installed as /etc/chat-ha/sentinel-password on the redis
#              machines and every frontend and backend host
#   FRONTENDS, BACKENDS   the frontend and backend hosts' addresses
#   INSTANCES  instances per frontend or backend host
#   ADDRESS_LIMIT  on lb: every limit per client address of HAProxy
#              (CHAT_HA_POSTS_PER_10S and the others), on frontend hosts:
#              the history replayed per client address
#              (frontend.replay_per_second, replay_burst); empty: as packaged
set -euo pipefail
: "${ROLE:?}" "${DEBS:?}" "${DEPS:=}" "${ADDRESS:?}" "${REDIS_HOSTS:?}" "${REDIS_PRIMARY:?}" "${LBS:?}" "${INSTANCES:=2}"
: "${REDIS_LAYOUT:=sentinel}"
case $REDIS_LAYOUT in sentinel | cluster) ;; *) echo "provision: error: REDIS_LAYOUT=$REDIS_LAYOUT: sentinel or cluster" >&2; exit 1 ;; esac
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

say() { echo "provision $ROLE: $*"; }
die() { echo "provision $ROLE: error: $*" >&2; exit 1; }

# The newest .deb of package $1 in $DEBS.
deb_of() {
    local f
    # shellcheck disable=SC2012
    f=$(ls -v "$DEBS/${1}_"*.deb 2>/dev/null | tail -1)
    [ -n "$f" ] || die "no ${1}_*.deb in $DEBS (run make deb on the host first)"
    echo "$f"
}

# install_debs DEPS_FOLDER PACKAGE [FILE.deb...]: installs the files and
# PACKAGE (a Debian dependency) with its own dependencies, from
# $DEPS/DEPS_FOLDER when that exists, else from the mirror ("-": none).
# Nothing is started meanwhile (policy-rc.d): the configuration is written
# first, then the services start once.
install_debs() {
    local deps=$1 package=$2; shift 2
    local files=("$@") offline=no
    if [ "$deps" = - ]; then
        offline=yes
    elif [ -n "$DEPS" ] && [ -d "$DEPS/$deps" ]; then
        files+=("$DEPS/$deps"/*.deb)
        offline=yes
    else
        files+=("$package")
    fi
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    if [ $offline = yes ]; then
        apt-get -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts=/dev/null \
            -o APT::Sandbox::User=root -y -q --no-install-recommends install "${files[@]}" >/tmp/provision-apt.log 2>&1 \
            || { tail -30 /tmp/provision-apt.log; die "apt-get install failed"; }
    else
        apt-get update -qq
        apt-get -o APT::Sandbox::User=root -y -q --no-install-recommends install "${files[@]}" >/tmp/provision-apt.log 2>&1 \
            || { tail -30 /tmp/provision-apt.log; die "apt-get install failed"; }
    fi
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
}

# Waits up to $1 seconds for the command after it to succeed.
wait_for() {
    local secs=$1; shift
    local i
    for ((i = 0; i < secs * 5; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    "$@"
}

# install_secret FILE DEST: the rig's password in FILE, root-only, at DEST.
install_secret() {
    [ -s "$1" ] || die "no password in $1"
    install -d -m 755 "$(dirname "$2")"
    install -m 600 "$1" "$2"
}

# The rig's Redis and Sentinel passwords, where the units and chat-redis
# read them.
install_password() {
    install_secret "${REDIS_PASSWORD_FILE:?}" /etc/chat-ha/redis-password
    install_secret "${SENTINEL_PASSWORD_FILE:?}" /etc/chat-ha/sentinel-password
}

# chat-redis and Redis, after the rig's passwords: the daemons' and the
# Redis users admin, replica and sentinel, the same on every redis machine,
# as an operator copies them (any server may become a primary).
install_chat_redis() {
    install_password
    install_secret "${REDIS_ADMIN_PASSWORD_FILE:?}" /etc/redis/admin-password
    install_secret "${REPLICA_PASSWORD_FILE:?}" /etc/redis/replica-password
    install_secret "${SENTINEL_USER_PASSWORD_FILE:?}" /etc/redis/sentinel-user-password
    install_debs redis redis-server "$(deb_of chat-redis)"
}

# rig_redis_conf LINE...: Debian's redis.conf, which chat-redis's
# /etc/redis/chat-ha.conf includes, listening on the rig address too with
# protected mode on, and the rig's LINEs at its end (in place of those of a
# run before).
rig_redis_conf() {
    local conf=/etc/redis/redis.conf
    sed -i -e "s|^bind .*|bind 127.0.0.1 $ADDRESS|" -e 's|^protected-mode .*|protected-mode yes|' \
        -e '/^# chat-ha rig: begin/,/^# chat-ha rig: end/d' "$conf"
    grep -q "^bind 127.0.0.1 $ADDRESS\$" "$conf" || die "could not set bind in $conf"
    { echo '# chat-ha rig: begin'; printf '%s\n' "$@"; echo '# chat-ha rig: end'; } >>"$conf"
}

# Points the daemons at the Sentinels of the redis machines (or at the
# cluster's nodes, every one a seed, with a replica's acknowledgement per
# post), has them listen on this machine's rig address and admit only the
# load balancers (and loopback); keeps only INSTANCES instances per host.
configure_daemons() {
    local daemon=$1 n base=9100 toml=/etc/chat-ha/chat-ha.toml sentinels seeds allow host
    [ "$daemon" = frontend ] || base=9200
    allow=$(for host in $LBS; do printf '"%s/32", ' "$host"; done)
    sed -i -e "s|^listen = \"127.0.0.1:$base\"|listen = \"$ADDRESS:$base\"|" \
        -e "s|^allow = .*|allow = [$allow\"127.0.0.0/8\", \"::1/128\"]|" "$toml"
    if [ "$REDIS_LAYOUT" = cluster ]; then
        seeds=$(for host in $REDIS_HOSTS; do printf '"redis://%s:6379", ' "$host"; done)
        sed -i -e "s|^url = \".*\"|# url: the cluster below|" \
            -e "s|^# cluster = .*|cluster = [${seeds%, }]|" \
            -e 's|^# min_replicas_acked = .*|min_replicas_acked = 1|' "$toml"
        grep -q '^cluster = \[' "$toml" || die "redis.cluster not set in $toml"
        grep -q '^min_replicas_acked = 1$' "$toml" || die "redis.min_replicas_acked not set in $toml"
    else
        sentinels=$(for host in $REDIS_HOSTS; do printf '"redis://%s:26379", ' "$host"; done)
        sed -i -e "s|^url = \".*\"|# url: the Sentinels below|" \
            -e "s|^# sentinels = .*|sentinels = [${sentinels%, }]|" \
            -e 's|^# sentinel_master = .*|sentinel_master = "chat-ha"|' "$toml"
        grep -q '^sentinel_master = "chat-ha"' "$toml" || die "redis.sentinels not set in $toml"
    fi
    # The history replayed per client address, like HAProxy's limits on lb:
    # every test client of the rig comes from one address, the host's.
    if [ "$daemon" = frontend ] && [ -n "${ADDRESS_LIMIT:-}" ]; then
        sed -i -e "s|^replay_per_second = .*|replay_per_second = $ADDRESS_LIMIT|" \
            -e "s|^replay_burst = .*|replay_burst = $ADDRESS_LIMIT|" "$toml"
    fi
    "/usr/bin/chat-$daemon" --check-config >/dev/null || die "chat-$daemon --check-config rejects $toml"
    local want
    want="address $ADDRESS port $base allow $(for host in $LBS; do printf '%s/32 ' "$host"; done)127.0.0.0/8 ::1/128 "
    [ "$("/usr/bin/chat-$daemon" --print-network | tr '\n' ' ')" = "$want" ] \
        || die "chat-$daemon --print-network: $("/usr/bin/chat-$daemon" --print-network | tr '\n' ' ')"
    for ((n = INSTANCES; n < $(nproc); n++)); do
        systemctl mask --now "chat-$daemon@$n.socket" "chat-$daemon@$n.service" >/dev/null 2>&1
    done
    systemctl daemon-reload
    # Started now, or restarted after a configuration change on a second run.
    systemctl restart chat-ha.target
    for ((n = 0; n < INSTANCES; n++)); do
        wait_for 20 systemctl is-active --quiet "chat-$daemon@$n.socket" "chat-$daemon@$n.service" \
            || die "chat-$daemon@$n is not active: $(systemctl is-active "chat-$daemon@$n.service")"
        # From loopback, which the instances admit (this machine's own rig
        # address is not a load balancer's).
        wait_for 20 curl -sf -o /dev/null --interface 127.0.0.1 "http://$ADDRESS:$((base + n))/${daemon%end}/status" \
            || die "http://$ADDRESS:$((base + n))/${daemon%end}/status does not answer"
    done
    say "chat-$daemon@0..$((INSTANCES - 1)) active on $ADDRESS, admitting $LBS, Redis ($REDIS_LAYOUT) on $REDIS_HOSTS"
}

# keepalived from the example chat-keepalived ships: this machine's priority
# and address, the other load balancers as peers, the floating address.
configure_keepalived() {
    local example=/usr/share/doc/chat-keepalived/examples/keepalived.conf.example conf=/etc/keepalived/keepalived.conf peers host
    [ -f "$example" ] || die "$example is missing"
    : "${FLOATING_ADDRESS:?}" "${PRIORITY:?}"
    # One line per peer, joined by sed's \n.
    peers=$(for host in $LBS; do [ "$host" = "$ADDRESS" ] || printf '        %s\\n' "$host"; done)
    mkdir -p /etc/keepalived
    sed -e "s|^    priority .*|    priority $PRIORITY|" \
        -e "s|^    unicast_src_ip .*|    unicast_src_ip $ADDRESS|" \
        -e "s|^        10.0.0.6\$|${peers%\\n}|" \
        -e "s|^        10.0.0.10/24 dev eth1|        $FLOATING_ADDRESS/24 dev eth1|" \
        "$example" >"$conf"
    grep -q "^    unicast_src_ip $ADDRESS\$" "$conf" || die "could not set unicast_src_ip in $conf"
    grep -q "^        $FLOATING_ADDRESS/24 dev eth1\$" "$conf" || die "could not set the floating address in $conf"
    local started
    started=$(date +%s)
    systemctl enable --quiet keepalived.service
    systemctl restart keepalived.service
    # Running, with its health check passing: a backup, or the master.
    vrrp_state() { journalctl -q --no-pager -u keepalived.service -o cat --since=@"$started" | grep -o 'Entering [A-Z]* STATE' | tail -1; }
    wait_for 15 sh -c 'systemctl is-active --quiet keepalived.service && journalctl -q --no-pager -u keepalived.service -o cat --since=@'"$started"' | grep -Eq "Entering (BACKUP|MASTER) STATE"' \
        || die "keepalived did not start: $(systemctl is-active keepalived.service); $(journalctl -q --no-pager -u keepalived.service -o cat -n 10 | tr '\n' ' ')"
    say "keepalived: priority $PRIORITY, peers $(printf '%b' "$peers" | tr -s ' \n' ' '), $(vrrp_state | tr '[:upper:]' '[:lower:]')"
}

# curl (checks below) and socat (HAProxy's stats socket): in the lxc box;
# fetched from the mirror on other boxes.
missing=
for tool in curl socat; do command -v "$tool" >/dev/null || missing="$missing $tool"; done
if [ -n "$missing" ]; then
    say "installing$missing"
    # shellcheck disable=SC2086
    { apt-get update -qq && apt-get install -y -q --no-install-recommends $missing >/dev/null; } \
        || die "could not install$missing"
fi

case $ROLE:$REDIS_LAYOUT in
redis:cluster)
    install_chat_redis
    [ -f /etc/redis/chat-ha-cluster.conf ] || die "/etc/redis/chat-ha-cluster.conf is missing (chat-redis too old?)"
    # Debian's redis.conf, which chat-redis's /etc/redis/chat-ha.conf
    # includes: listen on the rig address too, protected mode stays on; the
    # cluster settings chat-redis ships, this node's address as the others
    # and the clients must use it, a node taken for failed after 2 s (the
    # shipped 5 s would make the drill's failover slower), and the replica
    # login.
    rig_redis_conf 'include /etc/redis/chat-ha-cluster.conf' "cluster-announce-ip $ADDRESS" \
        'cluster-node-timeout 2000' 'masteruser replica' "masterauth $(cat /etc/redis/replica-password)"
    systemctl daemon-reload
    systemctl enable --quiet redis-server.service
    systemctl restart redis-server.service
    # redis-cli as admin (the password from the environment, not the command line).
    admin_at() { local host=$1; shift; REDISCLI_AUTH=$(cat /etc/redis/admin-password) redis-cli --user admin -h "$host" "$@"; }
    admin() { admin_at "$ADDRESS" "$@"; }
    wait_for 20 sh -c "redis-cli -h $ADDRESS ping | grep -q NOAUTH" || die "Redis on $ADDRESS:6379 does not refuse anonymous commands"
    [ "$(admin ping)" = PONG ] || die "Redis does not let admin in"
    in_cluster_mode() { admin_at "$1" info cluster | grep -q '^cluster_enabled:1'; }
    in_cluster_mode "$ADDRESS" || die "Redis on $ADDRESS:6379 is not in cluster mode"
    # The last redis machine, once the others run Redis in cluster mode
    # (machines may be provisioned in parallel): the cluster of them all,
    # three primaries and a replica each (redis-cli puts a replica on
    # another address than its primary), made once.
    if [ "$ADDRESS" = "$(echo "$REDIS_HOSTS" | awk '{print $NF}')" ]; then
        for host in $REDIS_HOSTS; do
            wait_for 180 in_cluster_mode "$host" || die "Redis on $host:6379 does not answer admin in cluster mode"
        done
        nodes=$(echo "$REDIS_HOSTS" | wc -w)
        if ! admin cluster info | grep -q "^cluster_known_nodes:$nodes"; then
            # shellcheck disable=SC2046
            admin --cluster create $(for host in $REDIS_HOSTS; do printf '%s:6379 ' "$host"; done) \
                --cluster-replicas 1 --cluster-yes </dev/null >/tmp/provision-cluster.log 2>&1 \
                || { tail -30 /tmp/provision-cluster.log; die "redis-cli --cluster create failed"; }
        fi
        # Every node finds the cluster ok; three primaries serve the slots,
        # each with a replica linked to it on another machine.
        cluster_ok() {
            local host nodes_out
            for host in $REDIS_HOSTS; do
                admin_at "$host" cluster info | grep -q '^cluster_state:ok' || return 1
            done
            nodes_out=$(admin cluster nodes) || return 1
            echo "$nodes_out" | awk '
                $3 ~ /master/ && $3 !~ /fail/ && NF >= 9 { primary[$1] = $2 }
                $3 ~ /slave/ && $3 !~ /fail/ && $8 == "connected" { replica[$4] = $2 }
                END {
                    n = 0
                    for (id in primary) {
                        if (!(id in replica)) exit 1
                        split(primary[id], p, ":"); split(replica[id], r, ":")
                        if (p[1] == r[1]) exit 1
                        n++
                    }
                    exit n == 3 ? 0 : 1
                }' || return 1
            for host in $REDIS_HOSTS; do
                if admin_at "$host" info replication | grep -q '^role:slave'; then
                    admin_at "$host" info replication | grep -q '^master_link_status:up' || return 1
                fi
            done
        }
        wait_for 60 cluster_ok || die "the Redis Cluster is not ok with 3 primaries each replicated on another machine: $(admin cluster nodes | tr '\n' ';')"
    fi
    say "redis-server (chat-redis) on $ADDRESS:6379, cluster mode ($(admin cluster info | grep '^cluster_state:' | tr -d '\r')), AOF $(admin config get appendonly | tail -1), maxmemory $(admin config get maxmemory | tail -1)"
    ;;
redis:sentinel)
    install_chat_redis
    install_debs redis-sentinel redis-sentinel
    admin_password=$(cat /etc/redis/admin-password)
    # Debian's redis.conf, which chat-redis's /etc/redis/chat-ha.conf
    # includes: listen on the rig address too, protected mode stays on; the
    # replication settings chat-redis ships, and (on a replica) the primary
    # at the start.
    replicaof=()
    [ "$ADDRESS" = "$REDIS_PRIMARY" ] || replicaof=("replicaof $REDIS_PRIMARY 6379")
    rig_redis_conf 'include /etc/redis/chat-ha-sentinel-replica.conf' 'masteruser replica' \
        "masterauth $(cat /etc/redis/replica-password)" "replica-announce-ip $ADDRESS" "${replicaof[@]}"
    # Sentinel: the example chat-redis ships, with this rig's addresses. A
    # primary that does not answer for 1 s is down (the example's 5 s would
    # not fit the drills' target of posting again within 5 s).
    example=/usr/share/doc/chat-redis/examples/sentinel-chat-ha.conf.example
    [ -f "$example" ] || die "$example is missing"
    sentinel=/etc/redis/sentinel.conf
    sed -e "s|^sentinel monitor chat-ha .*|sentinel monitor chat-ha $REDIS_PRIMARY 6379 2|" \
        -e "s|^# bind .*|bind 127.0.0.1 $ADDRESS|" \
        -e "s|^# sentinel announce-ip .*|sentinel announce-ip $ADDRESS|" \
        -e 's|^# sentinel auth-user .*|sentinel auth-user chat-ha sentinel|' \
        -e "s|^# sentinel auth-pass .*|sentinel auth-pass chat-ha $(cat /etc/redis/sentinel-user-password)|" \
        -e "s|^# requirepass .*|requirepass $(cat /etc/chat-ha/sentinel-password)|" \
        -e 's|^sentinel down-after-milliseconds chat-ha .*|sentinel down-after-milliseconds chat-ha 1000|' \
        -e 's|^sentinel failover-timeout chat-ha .*|sentinel failover-timeout chat-ha 10000|' \
        "$example" >"$sentinel.new"
    grep -q "^sentinel monitor chat-ha $REDIS_PRIMARY 6379 2\$" "$sentinel.new" || die "could not write $sentinel"
    # Sentinel rewrites its file as it learns the others.
    chown redis:redis "$sentinel.new" && chmod 640 "$sentinel.new" && mv "$sentinel.new" "$sentinel"
    systemctl daemon-reload
    systemctl enable --quiet redis-server.service redis-sentinel.service
    systemctl restart redis-server.service redis-sentinel.service
    admin() { redis-cli --no-auth-warning --user admin --pass "$admin_password" -h "$ADDRESS" "$@"; }
    wait_for 20 sh -c "redis-cli -h $ADDRESS ping | grep -q NOAUTH" || die "Redis on $ADDRESS:6379 does not refuse anonymous commands"
    [ "$(admin ping)" = PONG ] || die "Redis does not let admin in"
    if [ "$ADDRESS" != "$REDIS_PRIMARY" ]; then
        replicating() { admin info replication | grep -q '^master_link_status:up'; }
        wait_for 30 replicating || die "this replica does not replicate $REDIS_PRIMARY: $(admin info replication | tr '\r\n' '  ')"
    fi
    sentinel_says() { redis-cli --no-auth-warning -a "$(cat /etc/chat-ha/sentinel-password)" -h "$ADDRESS" -p 26379 "$@"; }
    wait_for 20 sh -c "redis-cli -h $ADDRESS -p 26379 ping | grep -q NOAUTH" || die "Sentinel on $ADDRESS:26379 does not refuse anonymous commands"
    names_primary() { sentinel_says sentinel get-master-addr-by-name chat-ha | grep -q "^$REDIS_PRIMARY\$"; }
    wait_for 20 names_primary \
        || die "Sentinel on $ADDRESS:26379 does not name $REDIS_PRIMARY the primary: $(sentinel_says sentinel get-master-addr-by-name chat-ha | tr '\n' ' ')"
    # The last redis machine: every Sentinel knows every other, and the
    # replicas (a failover needs them).
    others=$(($(echo "$REDIS_HOSTS" | wc -w) - 1))
    if [ "$ADDRESS" = "$(echo "$REDIS_HOSTS" | awk '{print $NF}')" ]; then
        sentinels_seen() { [ "$(sentinel_says sentinel sentinels chat-ha | grep -cx ip)" = "$others" ]; }
        replicas_seen() { [ "$(sentinel_says sentinel replicas chat-ha | grep -cx ip)" = "$others" ]; }
        wait_for 30 sentinels_seen || die "Sentinel on $ADDRESS knows $(sentinel_says sentinel sentinels chat-ha | grep -cx ip) other Sentinels, not $others"
        wait_for 30 replicas_seen || die "Sentinel on $ADDRESS knows $(sentinel_says sentinel replicas chat-ha | grep -cx ip) replicas, not $others"
        [ "$(sentinel_says sentinel ckquorum chat-ha | cut -d' ' -f1)" = OK ] || die "Sentinel quorum: $(sentinel_says sentinel ckquorum chat-ha)"
    fi
    say "redis-server (chat-redis) on $ADDRESS:6379 ($(admin role | head -1)), AOF $(admin config get appendonly | tail -1), maxmemory $(admin config get maxmemory | tail -1); Sentinel on $ADDRESS:26379: primary $(sentinel_says sentinel get-master-addr-by-name chat-ha | head -1)"
    ;;
frontend:* | backend:*)
    install_password
    install_debs - - "$(deb_of chat-ha-common)" "$(deb_of "chat-$ROLE")"
    configure_daemons "$ROLE"
    ;;
lb:*)
    install_debs haproxy haproxy "$(deb_of chat-haproxy)"
    install_debs keepalived keepalived "$(deb_of chat-keepalived)"
    [ -x /usr/sbin/haproxy ] || die "haproxy is not installed"
    # The chat hosts, in place of the shipped list (this host's instances):
    # INSTANCES frontends from port 9100 on each frontend host, as many
    # backends from 9200 on each backend host. HAProxy names their servers
    # HOST-N (front1-0, ..., back2-1), the cookie too.
    list=/etc/haproxy/chat-ha-servers.lst
    hosts() { # hosts DAEMON NAME_STEM BASE_PORT ADDRESSES...
        local daemon=$1 stem=$2 base=$3 host=0 addr; shift 3
        for addr in "$@"; do
            host=$((host + 1))
            echo "$daemon $stem$host $addr:$base $INSTANCES"
        done
    }
    {
        echo "# The rig's chat hosts (tests/rig/provision.sh)."
        # shellcheck disable=SC2086
        hosts chat-frontend front 9100 $FRONTENDS
        # shellcheck disable=SC2086
        hosts chat-backend back 9200 $BACKENDS
    } >"$list"
    # What haproxy.service will load: checked here, to fail with the reason.
    if ! /usr/lib/chat-haproxy/chat-ha-servers "$list" /etc/haproxy/chat-ha.cfg /tmp/chat-ha.cfg ||
        ! haproxy -c -q -f /etc/haproxy/haproxy.cfg -f /tmp/chat-ha.cfg; then
        die "haproxy -c rejects chat-ha.cfg with the servers of $list"
    fi
    servers_listed=$(($(echo "$FRONTENDS $BACKENDS" | wc -w) * INSTANCES))
    # The limits per client address: all the rig's test clients share one
    # address (the host's).
    dropin=/etc/systemd/system/haproxy.service.d/chat-ha-rig.conf
    if [ -n "${ADDRESS_LIMIT:-}" ]; then
        mkdir -p "${dropin%/*}"
        {
            echo '[Service]'
            for limit in POSTS_PER_10S READS_PER_10S SOCKETS_PER_ADDRESS CONNECTS_PER_10S AUTH_FAILURES_PER_MIN; do
                echo "Environment=CHAT_HA_$limit=$ADDRESS_LIMIT"
            done
        } >"$dropin"
    else
        rm -f "$dropin"
    fi
    systemctl daemon-reload
    systemctl enable --quiet haproxy.service
    systemctl restart haproxy.service
    wait_for 60 curl -sf -o /dev/null -H 'Host: localhost' http://127.0.0.1/front/status \
        || die "HAProxy does not answer /front/status on port 80 (haproxy.service $(systemctl is-active haproxy.service), HTTP status $(curl -s -o /dev/null -w '%{http_code}' -H 'Host: localhost' http://127.0.0.1/front/status))"
    # HAProxy's chat servers: "BACKEND/SERVER STATUS", one a line.
    chat_servers() { echo 'show stat' | socat stdio /run/haproxy/admin.sock \
        | awk -F, '$1 ~ /^chat_(front|back)$/ && $2 !~ /^(FRONTEND|BACKEND)$/ { print $1 "/" $2, $18 }'; }
    # One server per listed instance, every one UP (the hosts were
    # provisioned before this one).
    all_up() { [ "$(chat_servers | grep -c ' UP$')" = "$servers_listed" ] && [ "$(chat_servers | wc -l)" = "$servers_listed" ]; }
    wait_for 60 all_up || {
        chat_servers >&2
        die "HAProxy does not have the $servers_listed servers of $list, all UP"
    }
    say "HAProxy on $ADDRESS:80, servers UP: $(chat_servers | cut -d' ' -f1 | tr '\n' ' ')"
    configure_keepalived
    ;;
*) die "unknown ROLE $ROLE" ;;
esac
