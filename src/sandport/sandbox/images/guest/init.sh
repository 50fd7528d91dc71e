#!/bin/sh
# shellcheck shell=sh
# /init of a sandport microVM guest (sandport/sandbox/images/guest/init.sh), busybox sh.
# PID 1: mounts, virtio drivers, network from ip= on the kernel command line, the
# per-sandbox seed, then the profile's services (profile.sh: echo.sh or desktop.sh).
# Lines starting with $MARKER on the serial console are read by sandport's QEMU backend.
#
# The image's constants (ports, paths, the marker) come from image.env, which the builder
# writes (sandport.sandbox.images.scripts.image_env) with every value shell-quoted.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root USER=root LOGNAME=root LANG=C
set -f  # no globbing: words from /proc/cmdline and the seed are data
# shellcheck source=/dev/null
. /usr/share/sandport/image.env

say() { echo "$MARKER $*"; }
alive() {  # a pid that runs (a zombie, exited but not reaped yet, does not)
  s=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)
  [ -n "$s" ] && [ "$s" != Z ]
}
listening() {  # listening tcp|udp PORT: a socket is bound to PORT (tcp: in LISTEN, 0A)
  cat "/proc/net/$1" "/proc/net/${1}6" 2>/dev/null |
    awk -v port=":$(printf %04X "$2")" -v tcp="$([ "$1" = tcp ] && echo 1)" \
      'substr($2, length($2) - 4) == port && (!tcp || $4 == "0A") {found = 1}
       END {exit !found}'
}
await_ports() {  # await_ports tcp:7 udp:7 ...: until each is served (bounded: 20 s)
  for spec in "$@"; do
    i=0
    until listening "${spec%%:*}" "${spec#*:}"; do
      if [ "$i" -ge 2000 ]; then say "error services: nothing serves $spec after 20 s"; return 1; fi
      usleep 10000; i=$((i + 1))
    done
  done
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run/sandport
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
for m in $VIRTIO_MODULES; do  # a space-separated list, in load order
  insmod "$MODULE_DIR/$m.ko" || say "warning insmod $m failed"
done
dmesg -n 4  # the console is for our lines now; kernel warnings still show
ip link set lo up

# --- the seed (appended per sandbox by the backend) ---------------------------------------
SANDPORT_SANDBOX_ID=unseeded
SANDPORT_COLOUR=$DEFAULT_COLOUR
SANDPORT_DESKTOP_NAME=
# shellcheck disable=SC2034  # the agent's token and gateway: desktop.sh reads them
SANDPORT_AGENT_TOKEN='' SANDPORT_GATEWAY_URL=''
if [ ! -r "$SEED_ENV" ]; then
  say "warning no $SEED_ENV: defaults in use"
elif ! sh -n "$SEED_ENV" 2>/dev/console; then
  say "warning $SEED_ENV is not valid shell: defaults in use"
else
  # shellcheck source=/dev/null
  . "$SEED_ENV"
fi
[ -n "$SANDPORT_DESKTOP_NAME" ] || SANDPORT_DESKTOP_NAME="sandport $SANDPORT_SANDBOX_ID"
export SANDPORT_SANDBOX_ID SANDPORT_COLOUR SANDPORT_DESKTOP_NAME

# --- network: ip=<client>:<server>:<gw>:<netmask>:<host>:<dev>:<autoconf> or ip=dhcp ------
IP_ARG=
read -r CMDLINE </proc/cmdline
for a in $CMDLINE; do  # its words (set -f: no globbing)
  case "$a" in ip=*) IP_ARG=${a#ip=} ;; esac
done
NET_ADDR=
net_up() {
  CLIENT='' GW='' MASK='' HOST='' DEV='' AUTO=''
  case "$IP_ARG" in
    ""|off|none) say "net none (no ip= on the kernel command line)"; return 0 ;;
    dhcp|on|any|both|bootp|rarp) AUTO=dhcp ;;
    # <server> (the second field) is skipped: the guest's root is its initramfs.
    *) IFS=: read -r CLIENT _ GW MASK HOST DEV AUTO <<EOF
$IP_ARG
EOF
  esac
  DEV=${DEV:-eth0}
  [ -n "$HOST" ] && hostname "$HOST"
  i=0
  while [ ! -e "/sys/class/net/$DEV" ]; do
    if [ "$i" -ge 500 ]; then
      say "error net: no $DEV within 5 s (is there a -device virtio-net-device?)"
      return 1
    fi
    usleep 10000; i=$((i + 1))
  done
  ip link set "$DEV" up
  case "$AUTO" in
    dhcp|on|any|both|bootp|rarp)
      if ! udhcpc -i "$DEV" -s /usr/share/sandport/udhcpc.script -t 10 -T 1 -n \
          ${HOST:+-x "hostname:$HOST"} >/dev/console 2>&1; then
        say "error net: no DHCP lease on $DEV"
        return 1
      fi
      read -r NET_ADDR GW </run/sandport/net.dhcp ;;
    *)
      if [ -z "$CLIENT" ]; then say "net $DEV none (no address in ip=)"; return 0; fi
      PREFIX=
      eval "$(ipcalc -p "$CLIENT" ${MASK:+"$MASK"})"
      if [ -z "$PREFIX" ] || ! ip addr add "$CLIENT/$PREFIX" dev "$DEV"; then
        say "error net: cannot set address $CLIENT netmask ${MASK:-(class)} on $DEV"
        return 1
      fi
      NET_ADDR=$CLIENT/$PREFIX
      if [ -n "$GW" ] && ! ip route add default via "$GW" dev "$DEV"; then
        say "error net: cannot add the default route via $GW"
        return 1
      fi ;;
  esac
  say "net $DEV $NET_ADDR gw ${GW:-none}"
}
net_up
[ -n "$HOST" ] || hostname "sp-$SANDPORT_SANDBOX_ID"
echo "127.0.0.1 localhost $(hostname)" >/etc/hosts

# --- the profile's services (echo.sh or desktop.sh, installed as profile.sh) --------------
# shellcheck source=/dev/null
. /usr/share/sandport/profile.sh

# PID 1 must never exit (the kernel would panic); waiting also reaps orphaned children.
while :; do
  wait
  sleep 3600
done
