#!/bin/bash
# Installs what the qemu provider needs on a Debian 12 (bookworm) host. Idempotent, non-interactive.
#
#   sudo crates/provider-qemu/install-deps.sh
#
# - qemu-system-x86 comes from bookworm-backports: machines of this kind ship qemu-utils 10 from
#   backports, which conflicts with bookworm's qemu-system-x86 7.2. The backports apt source is
#   derived from the machine's own first deb822 source (same mirror), so no host name lives here.
# - Image building: mmdebstrap e2fsprogs busybox-static cpio; seed ISOs: genisoimage.
# - Guest access from inside the lab namespace: openssh-client; namespaces/taps: iproute2.
# - Anti-spoofing rules on guest ports: nftables; its attack test (tests/attack_spoof.rs) also
#   sends spoofed ARP with arping and pings with iputils-ping.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" != 0 ]; then
  echo "install-deps.sh: run as root (sudo $0)" >&2
  exit 1
fi

SOURCES=/etc/apt/sources.list.d/debian.sources
BACKPORTS=/etc/apt/sources.list.d/bookworm-backports.sources
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")

if [ "$codename" = bookworm ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  if [ ! -r "$SOURCES" ]; then
    echo "install-deps.sh: $SOURCES not found; add bookworm-backports to apt yourself, then rerun" >&2
    exit 1
  fi
  # First stanza of the machine's own sources (the main archive), with the suite swapped.
  awk 'BEGIN{RS="";ORS="\n\n"} NR==1' "$SOURCES" \
    | sed -e 's/^Suites:.*/Suites: bookworm-backports/' -e '/^# /d' > "$BACKPORTS.tmp"
  mv "$BACKPORTS.tmp" "$BACKPORTS"
  echo "install-deps.sh: added $BACKPORTS"
fi

apt-get update -q

if [ "$codename" = bookworm ]; then
  apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils
else
  apt-get install -y -q --no-install-recommends qemu-system-x86 qemu-utils
fi

apt-get install -y -q --no-install-recommends \
  mmdebstrap e2fsprogs busybox-static cpio gzip genisoimage iproute2 openssh-client \
  nftables arping iputils-ping

qemu-system-x86_64 --version | head -1
