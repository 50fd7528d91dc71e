#!/bin/sh
# shellcheck shell=sh
# The echo profile's services (sandport/sandbox/images/guest/echo.sh), sourced by /init
# (init.sh) as /usr/share/sandport/profile.sh: TCP and UDP echo on $ECHO_PORT, HTTP on
# $HTTP_PORT serving "sandport echo <sandbox id>". init.sh defines say and await_ports.
mkdir -p /www
echo "sandport echo $SANDPORT_SANDBOX_ID" >/www/index.html
nc -ll -p "$ECHO_PORT" -e /bin/cat </dev/null >/dev/console 2>&1 &
socat "UDP4-LISTEN:$ECHO_PORT,fork" PIPE </dev/null >/dev/console 2>&1 &
httpd -f -p "$HTTP_PORT" -h /www </dev/null >/dev/console 2>&1 &
await_ports "tcp:$ECHO_PORT" "udp:$ECHO_PORT" "tcp:$HTTP_PORT" && say "services echo started"
