#!/bin/sh
# shellcheck shell=sh
# udhcpc event script (sandport/sandbox/images/guest/udhcpc.sh, in the guest at
# /usr/share/sandport/udhcpc.script): configure $interface from the lease; /init reads
# /run/sandport/net.dhcp. udhcpc passes the lease in the environment.
# shellcheck disable=SC2154  # interface, ip, mask, subnet, router: set by udhcpc
case "$1" in
  deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up ;;
  bound|renew)
    prefix=$mask
    [ -n "$prefix" ] || prefix=$(ipcalc -p "$ip" "$subnet" | cut -d= -f2)
    if ! ip -4 addr show dev "$interface" | grep -q "inet $ip/$prefix "; then
      ip -4 addr flush dev "$interface"
      ip addr add "$ip/$prefix" dev "$interface"
    fi
    gw=none
    for r in $router; do gw=$r; break; done
    [ "$gw" = none ] || ip route replace default via "$gw" dev "$interface"
    echo "$ip/$prefix $gw" >/run/sandport/net.dhcp ;;
esac
exit 0
