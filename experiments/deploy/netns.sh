#!/usr/bin/env bash
# Separate "hosts" on one machine: network namespaces joined by veth pairs to a bridge, the
# way a SuperLink, its SuperNodes and an operator's workstation sit on separate machines
# of one LAN. Needs root (ip netns). The bridge lives in its own namespace too, so no
# traffic and no interface touches the machine's own network.
#
#   bash experiments/deploy/netns.sh up PREFIX NODES   # make the hosts, print the table
#   bash experiments/deploy/netns.sh down PREFIX       # remove every namespace of PREFIX
#   bash experiments/deploy/netns.sh list PREFIX
#
# Hosts (namespace name, address on 10.<net>.0.0/24 where <net> is derived from PREFIX):
#   PREFIX-link   .1   the SuperLink
#   PREFIX-op     .2   the operator (`flwr supernode register`, `flwr run`)
#   PREFIX-node-i .(10+i)  SuperNode i
# `up` prints "name namespace address" lines; `down` succeeds when nothing is left.
set -Eeuo pipefail  # -E: the ERR trap of `up` also fires inside host()

die() { echo "netns.sh: $*" >&2; exit 2; }
[ $# -ge 2 ] || die "usage: netns.sh up PREFIX NODES | down PREFIX | list PREFIX"
ACTION=$1 PREFIX=$2
[[ $PREFIX =~ ^[a-z][a-z0-9]{0,7}$ ]] || die "PREFIX must be 1-8 lowercase letters/digits"
[ "$(id -u)" = 0 ] || die "network namespaces need root"
command -v ip >/dev/null || die "iproute2 (ip) is missing"
# one /24 per prefix, so that two topologies never share addresses
NET=$((16 + $(printf '%s' "$PREFIX" | cksum | cut -d' ' -f1) % 200))
SWITCH=$PREFIX-sw

namespaces() { ip netns list | awk '{print $1}' | grep -E "^$PREFIX-(sw|link|op|node-[0-9]+)$" || true; }

down() {
    local ns
    for ns in $(namespaces); do
        # processes still inside keep a namespace alive after its name is gone: refuse
        if [ -n "$(ip netns pids "$ns" 2>/dev/null)" ]; then
            echo "netns.sh: killing processes left in $ns" >&2
            ip netns pids "$ns" | xargs -r kill -KILL 2>/dev/null || true
        fi
        ip netns del "$ns"
    done
    [ -z "$(namespaces)" ] || die "namespaces left: $(namespaces | tr '\n' ' ')"
}

host() {  # host NAME INDEX ADDRESS-SUFFIX: a namespace with eth0 on the bridge
    local ns=$PREFIX-$1 i=$2 addr=10.$NET.0.$3
    ip netns add "$ns"
    # made inside the switch's namespace: no interface ever appears in the machine's own
    ip -n "$SWITCH" link add "v$PREFIX$i" type veth peer name eth0 netns "$ns"
    ip -n "$SWITCH" link set "v$PREFIX$i" master br0 up
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    echo "$1 $ns $addr"
}

case "$ACTION" in
    up)
        NODES=${3:?usage: netns.sh up PREFIX NODES}
        [[ $NODES =~ ^[1-9][0-9]?$ ]] || die "NODES must be 1-99, got '$NODES'"
        [ -z "$(namespaces)" ] || die "namespaces of $PREFIX exist already (netns.sh down $PREFIX)"
        trap 'down >/dev/null 2>&1 || true' ERR
        ip netns add "$SWITCH"
        ip -n "$SWITCH" link add br0 type bridge
        ip -n "$SWITCH" link set br0 up
        host link 0 1
        host op 1 2
        for ((i = 0; i < NODES; i++)); do host "node-$i" $((i + 2)) $((10 + i)); done
        trap - ERR
        ;;
    down) down ;;
    list) namespaces ;;
    *) die "unknown action '$ACTION' (up, down, list)" ;;
esac
