#!/bin/sh
# shellcheck shell=sh
# The desktop profile's services (sandport/sandbox/images/guest/desktop.sh), sourced by
# /init (init.sh) as /usr/share/sandport/profile.sh: Xvnc :$VNC_DISPLAY (VncAuth), the
# background colour, openbox, a window naming the sandbox; the guest agent when the seed
# names its gateway. init.sh defines say, alive and await_ports, NET_ADDR and the seed.
export DISPLAY=":$VNC_DISPLAY" XDG_RUNTIME_DIR=/run
start_desktop() {
  [ -r "$SEED_VNC_PASSWORD" ] ||
    say "warning no $SEED_VNC_PASSWORD: VNC Authentication will refuse every password"
  rm -f "/tmp/.X11-unix/X$VNC_DISPLAY" "/tmp/.X$VNC_DISPLAY-lock"
  Xvnc ":$VNC_DISPLAY" -rfbport "$VNC_PORT" -SecurityTypes VncAuth \
    -PasswordFile "$SEED_VNC_PASSWORD" -desktop "$SANDPORT_DESKTOP_NAME" \
    -geometry "$DESKTOP_GEOMETRY" -depth 24 -AlwaysShared \
    -BlacklistThreshold "$XVNC_BLACKLIST_THRESHOLD" \
    -nolisten tcp </dev/null >/dev/console 2>&1 &
  XVNC=$!
  i=0
  while [ ! -S "/tmp/.X11-unix/X$VNC_DISPLAY" ]; do
    if ! alive "$XVNC"; then say "error desktop: Xvnc exited (its output is above)"; return 1; fi
    if [ "$i" -ge 3000 ]; then say "error desktop: no display :$VNC_DISPLAY within 30 s"; return 1; fi
    usleep 10000; i=$((i + 1))
  done
  xsetroot -solid "$SANDPORT_COLOUR" </dev/null >/dev/console 2>&1 ||
    say "warning xsetroot -solid $SANDPORT_COLOUR failed"
  openbox </dev/null >/dev/console 2>&1 &
  # xmessage speaks Latin-1: ASCII only.
  xmessage -center -buttons "" -title "$SANDPORT_DESKTOP_NAME" -bg white -fg black \
    "$(printf 'sandport sandbox %s\n%s  -  background %s' "$SANDPORT_SANDBOX_ID" \
       "${NET_ADDR%/*}" "$SANDPORT_COLOUR")" </dev/null >/dev/console 2>&1 &
  await_ports "tcp:$VNC_PORT" && say "services desktop started"
}
# The guest agent (/health, credentials to the gateway) when the seed names its gateway;
# started first: Python's start-up overlaps the desktop's.
AGENT=
if [ -n "$SANDPORT_AGENT_TOKEN" ] && [ -n "$SANDPORT_GATEWAY_URL" ]; then
  SANDPORT_AGENT_TOKEN=$SANDPORT_AGENT_TOKEN SANDPORT_GATEWAY_URL=$SANDPORT_GATEWAY_URL \
    SANDPORT_AGENT_LISTEN="0.0.0.0:$AGENT_PORT" \
    python3.11 -I -S "$GUEST_AGENT" </dev/null >/dev/console 2>&1 &
  AGENT=1
fi
start_desktop
[ -z "$AGENT" ] || { await_ports "tcp:$AGENT_PORT" && say "services agent started"; }
