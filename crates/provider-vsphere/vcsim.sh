#!/usr/bin/env bash
# Builds VMware's vSphere API simulator (vcsim, govmomi 0.24.2) from Debian bookworm packages, once.
#
#   crates/provider-vsphere/vcsim.sh            # build if missing, print the binary's path
#   crates/provider-vsphere/vcsim.sh path       # print the binary's path (no build)
#
# Cache dir: $BASPHERE_VCSIM_CACHE (default /var/cache/basphere-test/vcsim); the binary lands in
# $CACHE/bin/vcsim. When it is there the script returns at once. Needs root for apt-get (it installs
# golang-go and the govmomi library packages non-interactively).
#
# Why the source package: golang-github-vmware-govmomi-dev ships the simulator library but leaves
# out vcsim/main.go (debian/rules excludes it); the source package's tarball has it. The deb-src
# entry is derived from this machine's own apt sources into a private list, so /etc/apt is untouched.
set -euo pipefail
CACHE=${BASPHERE_VCSIM_CACHE:-/var/cache/basphere-test/vcsim}
BIN="$CACHE/bin/vcsim"

if [ "${1:-}" = path ]; then echo "$BIN"; exit 0; fi
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9                      # two test binaries building at once wait for each other
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
cd "$CACHE"

export DEBIAN_FRONTEND=noninteractive
pkgs=(golang-go golang-github-vmware-govmomi-dev golang-github-kr-pretty-dev)
if ! dpkg -s "${pkgs[@]}" >/dev/null 2>&1; then
  apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${pkgs[@]}" >&2
fi

if [ ! -f golang-github-vmware-govmomi_0.24.2.orig.tar.xz ]; then
  mkdir -p apt-src/lists/partial
  sources=/etc/apt/sources.list.d/debian.sources
  if [ -f "$sources" ]; then
    sed 's/^Types: deb$/Types: deb-src/' "$sources" > apt-src/debian-src.sources
  else
    grep -h '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' > apt-src/debian-src.list
  fi
  opt=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$CACHE/apt-src"
       -o Dir::State::Lists="$CACHE/apt-src/lists")
  apt-get "${opt[@]}" update -qq >&2
  apt-get "${opt[@]}" source --download-only golang-github-vmware-govmomi=0.24.2-3 >&2
fi
[ -d govmomi-0.24.2 ] || tar xJf golang-github-vmware-govmomi_0.24.2.orig.tar.xz
mkdir -p gopath/src/github.com/vmware bin
ln -sfn "$CACHE/govmomi-0.24.2" gopath/src/github.com/vmware/govmomi
export GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH="$CACHE/gopath:/usr/share/gocode" GOCACHE="$CACHE/gocache"
(cd gopath/src/github.com/vmware/govmomi && go build -o "$BIN.tmp" ./vcsim) >&2
mv "$BIN.tmp" "$BIN"
echo "$BIN"
