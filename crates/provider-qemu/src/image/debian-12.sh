#!/bin/bash
# Builds the `debian-12` guest image for direct kernel boot into the directory given as $1:
#   base.qcow2      ext4 root filesystem (no partition table) with cloud-init (NoCloud only)
#   vmlinuz         the guest's cloud kernel
#   initrd-tiny.img busybox + virtio modules; mounts /dev/vda and switches root (~1 MB)
# Embedded in basphere-qemu (image.rs), which runs it in a fresh temporary directory and renames
# that directory into place only when this script succeeded.
# Inputs (environment): MIRROR (required) and SECMIRROR (optional) apt URIs, taken by the caller
# from the host's own apt sources; SUITE (default bookworm); SIZE of the root fs (default 2G).
# Lines starting with "step: " are progress for the caller. Needs root, mmdebstrap, mke2fs,
# busybox-static, cpio, qemu-img.
set -euo pipefail
OUT=${1:?usage: $0 OUTPUT_DIR}
: "${MIRROR:?MIRROR must name the Debian archive URI}"
SECMIRROR=${SECMIRROR:-}
SUITE=${SUITE:-bookworm}
SIZE=${SIZE:-2G}
KPKG=${KPKG:-linux-image-cloud-amd64}
export OUT
mkdir -p "$OUT"
cd "$OUT"

sources=("deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main")
[ -n "$SECMIRROR" ] && sources+=("deb $SECMIRROR $SUITE-security main")

echo "step: installing Debian $SUITE into a root filesystem (mmdebstrap, ~2 min)"
mmdebstrap \
  --variant=apt --components=main --quiet \
  --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --include="$KPKG,systemd-sysv,udev,cloud-init,openssh-server,iproute2,sudo,netbase,e2fsprogs" \
  --essential-hook='mkdir -p "$1/etc/initramfs-tools/conf.d"
      printf "MODULES=list\nCOMPRESS=gzip\n" > "$1/etc/initramfs-tools/conf.d/guest.conf"' \
  --customize-hook='
      set -e
      r="$1"
      echo "/dev/vda / ext4 defaults,noatime,errors=remount-ro 0 1" > "$r/etc/fstab"
      # cloud-init: NoCloud only (no probing of cloud metadata IPs), networkd renderer
      cat > "$r/etc/cloud/cloud.cfg.d/90-basphere.cfg" <<EOC
datasource_list: [ NoCloud, None ]
system_info:
  network:
    renderers: [ networkd, eni ]
EOC
      # only the cloud-init modules a self-service VM needs; ed25519 host key only (TCG speed)
      cat > "$r/etc/cloud/cloud.cfg.d/95-basphere-fast.cfg" <<EOC
cloud_init_modules: [ seed_random, bootcmd, write-files, growpart, resizefs, set_hostname,
                      update_hostname, update_etc_hosts, users-groups, ssh ]
cloud_config_modules: [ set-passwords, runcmd ]
cloud_final_modules: [ scripts-per-once, scripts-per-boot, scripts-per-instance, scripts-user,
                       final-message ]
ssh_genkeytypes: [ ed25519 ]
manage_etc_hosts: true
EOC
      chroot "$r" systemctl enable systemd-networkd.service
      # first-boot hygiene: fresh machine-id, no baked host keys, no hostname
      : > "$r/etc/machine-id"; rm -f "$r/var/lib/dbus/machine-id"
      rm -f "$r"/etc/ssh/ssh_host_*
      echo localhost > "$r/etc/hostname"
      # nothing in the guest should reach out on its own
      chroot "$r" systemctl disable apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer 2>/dev/null || true
      chroot "$r" systemctl mask systemd-timesyncd.service 2>/dev/null || true
      # headless VM: no VTs, no binfmt, no e2scrub; journal in RAM
      chroot "$r" systemctl mask getty-static.service e2scrub_reap.service systemd-binfmt.service \
          proc-sys-fs-binfmt_misc.automount sys-kernel-debug.mount sys-kernel-tracing.mount \
          dev-hugepages.mount dev-mqueue.mount systemd-pstore.service 2>/dev/null || true
      mkdir -p "$r/etc/systemd/journald.conf.d"
      printf "[Journal]\nStorage=volatile\n" > "$r/etc/systemd/journald.conf.d/volatile.conf"
      cp -L "$r/vmlinuz" "$OUT/vmlinuz" 2>/dev/null || cp "$r"/boot/vmlinuz-* "$OUT/vmlinuz"
      rm -rf "$r"/var/cache/apt/*.bin "$r"/var/log/*.log "$r"/boot/initrd.img-* "$r"/initrd.img*
  ' \
  "$SUITE" rootfs "${sources[@]}"

echo "step: making the tiny initrd (busybox + virtio modules)"
KVER=$(ls rootfs/usr/lib/modules | head -1)
t=$(mktemp -d "$OUT/initrd.XXXXXX")
mkdir -p "$t"/{bin,dev,proc,sys,root,lib/modules}
cp /bin/busybox "$t/bin/busybox"
MODS="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_mmio virtio_blk"
for m in $MODS; do
  f=$(find "rootfs/usr/lib/modules/$KVER" -name "$m.ko*" | head -1)
  [ -n "$f" ] || continue                       # built into the kernel
  case $f in
    *.xz)  xz  -dc "$f" > "$t/lib/modules/$m.ko" ;;
    *.zst) zstd -qdc "$f" > "$t/lib/modules/$m.ko" ;;
    *)     cp "$f" "$t/lib/modules/$m.ko" ;;
  esac
done
cat > "$t/init" <<EOI
#!/bin/busybox sh
B=/bin/busybox
\$B mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
\$B mount -t proc proc /proc
for m in $MODS; do
  [ -f /lib/modules/\$m.ko ] && \$B insmod /lib/modules/\$m.ko 2>/dev/null
done
root=/dev/vda; for a in \$(\$B cat /proc/cmdline); do case \$a in root=/dev/*) root=\${a#root=};; esac; done
echo "basphere-initrd: kernel up, mounting \$root"
i=0; while [ ! -b \$root ] && [ \$i -lt 500 ]; do \$B usleep 10000; i=\$((i+1)); done
\$B mount -t ext4 -o rw,noatime \$root /root || { echo "tiny-initrd: cannot mount \$root"; exec \$B sh; }
\$B umount /proc
\$B mount --move /dev /root/dev
exec \$B switch_root /root /sbin/init
EOI
chmod +x "$t/init"
(cd "$t" && find . | cpio -o -H newc --quiet | gzip -1) > initrd-tiny.img
rm -rf "$t"

echo "step: writing the ext4 root filesystem and converting it to qcow2"
mke2fs -q -t ext4 -L rootfs -E root_owner=0:0 -d rootfs base.raw "$SIZE"
rm -rf rootfs
qemu-img convert -O qcow2 base.raw base.qcow2
rm -f base.raw
echo "step: done: $(du -h --apparent-size base.qcow2 | cut -f1) base.qcow2"
