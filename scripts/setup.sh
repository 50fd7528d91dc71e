#!/usr/bin/env bash
# One idempotent set-up step for `make demo` and `make test` on Debian 12 as root:
# Debian packages (apt-get update once, only when something is missing), then a venv
# in .venv with sandport installed editable with its dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."

# Runtime: Xvnc + openbox desktop, xsetroot/xmessage for the sandbox's face, noVNC.
# Tests: x11vnc (-storepasswd cross-check), chromium + chromedriver (browser tier),
# websockify (the peer the bridge is compared with), nftables/iproute2 (hygiene checks).
# Bench (`make bench`): iperf3 (load), socat and passt (pasta: the forwarders compared with),
# slirp4netns (the user-mode stack usernet is compared with).
# QEMU microVM sandboxes: qemu-system-x86 runs them; busybox-static is their userland and
# lz4 packs their initramfs (`sandport image build` copies the desktop programs above and
# socat, the echo image's UDP echo, into the image).
# Lint (`make lint`): shellcheck checks the guest init scripts and these shell scripts.
PACKAGES=(
  tigervnc-standalone-server openbox x11-xserver-utils x11-utils fonts-dejavu-core
  novnc x11vnc chromium chromium-driver websockify
  iproute2 nftables procps python3-venv crun
  iperf3 socat passt slirp4netns
  qemu-system-x86 busybox-static lz4
  shellcheck
)

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: needs root to install Debian packages (run: sudo make ...)" >&2
  exit 2
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
stamp=.venv/.sandport-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing sandport and its dev tools into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
