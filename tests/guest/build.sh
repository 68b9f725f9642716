#!/usr/bin/env bash
# Build the netkit test guest: a Debian kernel and a small busybox initramfs.
#
#   tests/guest/build.sh [OUTDIR]        (also: make guest-image)
#
# Everything comes from Debian packages fetched with `apt-get download` (no other
# network access): the kernel behind linux-image-amd64, busybox-static, and rdate (an
# SNTP client; Debian's busybox has no ntpd applet) with the three libraries it links.
# Outputs, in OUTDIR (default build/guest, or $NETKIT_GUEST_DIR):
#
#   vmlinuz          the kernel
#   initramfs.gz     busybox + /init (tests/guest/init.sh) + virtio-net and 9p modules
#   debs/            the downloaded packages (cached: delete to pick up new versions)
#
# The .debs are downloaded once; the initramfs is rebuilt only when this script or
# init.sh is newer than it (or when FORCE=1). Nothing here needs root.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-${NETKIT_GUEST_DIR:-$root/build/guest}}
mkdir -p "$out/debs"
out=$(cd "$out" && pwd)
debs=$out/debs

# Kernel modules the guest needs and does not get built in from Debian's config:
# the virtio PCI transport and NIC, and 9P over TCP. Their dependencies are added
# from each module's own "depends=" field, so the list survives kernel updates.
modules=(virtio_pci virtio_net virtio_blk 9p 9pnet_fd)

log() { echo "guest-image: $*" >&2; }

up_to_date() {
  [ "${FORCE:-0}" != 1 ] && [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.gz" ] \
    && [ "$out/initramfs.gz" -nt "$here/init.sh" ] && [ "$out/initramfs.gz" -nt "$here/build.sh" ] \
    && [ "$out/initramfs.gz" -nt "$here/udhcpc.script" ]
}
if up_to_date; then
  log "up to date: $out/vmlinuz $out/initramfs.gz"
  exit 0
fi
start=$(date +%s)

# ------------------------------------------------------------------ download (cached)
apt_download() {  # apt_download PKG... (into $debs); refreshes the package lists once if needed
  (cd "$debs" && apt-get download "$@" 2>&1 | { grep -v '^W: Download is performed unsandboxed' >&2 || true; }) && return 0
  if [ "$(id -u)" = 0 ]; then
    log "apt-get download failed; refreshing package lists and retrying"
    apt-get update -qq
    (cd "$debs" && apt-get download "$@" 2>&1 | { grep -v '^W: Download is performed unsandboxed' >&2 || true; }) && return 0
  fi
  log "error: could not download $* (run 'apt-get update' as root?)"
  return 1
}
have_deb() { compgen -G "$debs/$1_*.deb" >/dev/null; }

if ! compgen -G "$debs/linux-image-[0-9]*.deb" >/dev/null; then
  # linux-image-amd64 is a metapackage; the kernel is the versioned package it depends on.
  kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
  if [ -z "$kpkg" ]; then
    [ "$(id -u)" = 0 ] && apt-get update -qq
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
  fi
  [ -n "$kpkg" ] || { log "error: cannot resolve linux-image-amd64 (apt-get update?)"; exit 1; }
  log "downloading $kpkg (about 70 MB, once)"
  apt_download "$kpkg"
fi
for pkg in busybox-static rdate libbsd0 libmd0 libc6; do
  have_deb "$pkg" || apt_download "$pkg"
done

# ------------------------------------------------------------------ unpack
work=$(mktemp -d "$out/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
for deb in "$debs"/*.deb; do
  dpkg -x "$deb" "$work/x"
done
x=$work/x
kver=$(basename "$(ls -d "$x"/lib/modules/*/ | sort -V | tail -n1)")
moddir=$x/lib/modules/$kver
bb=$x/bin/busybox
[ -x "$bb" ] || { log "error: busybox-static did not unpack a /bin/busybox"; exit 1; }
cp "$x/boot/vmlinuz-$kver" "$work/vmlinuz"

# ------------------------------------------------------------------ modules + deps
find_module() {  # path of the .ko[.xz|.zst|.gz] for a module name ('-' and '_' are equivalent)
  local name=$1 alt=${1//_/-} f
  for f in $(find "$moddir/kernel" -name "$name.ko*" -o -name "$alt.ko*"); do echo "$f"; return 0; done
  return 1
}
module_text() {  # the uncompressed module on stdout
  case "$1" in
    *.ko.xz) "$bb" xzcat "$1" ;;
    *.ko.gz) "$bb" zcat "$1" ;;
    *.ko.zst) zstd -dcq "$1" ;;
    *) cat "$1" ;;
  esac
}
is_builtin() { grep -Eq "/(${1}|${1//_/-})\.ko\$" "$moddir/modules.builtin" 2>/dev/null; }

stage=$work/root
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc/udhcpc,proc,sys,dev,tmp,run,mnt,root,lib/modules,lib64}
mkdir -p "$stage/lib/x86_64-linux-gnu"
order=()     # load order: every module after its dependencies
declare -A seen=()
visit() {
  local name=${1//-/_} path deps dep
  [ -n "${seen[$name]:-}" ] && return 0
  seen[$name]=1
  if is_builtin "$name"; then return 0; fi
  path=$(find_module "$name") || { log "error: module $name not found in $kver"; exit 1; }
  module_text "$path" > "$stage/lib/modules/$name.ko"
  deps=$(tr '\0' '\n' < "$stage/lib/modules/$name.ko" | sed -n 's/^depends=//p' | head -n1)
  for dep in ${deps//,/ }; do visit "$dep"; done
  order+=("$name")
}
for m in "${modules[@]}"; do visit "$m"; done
printf '%s\n' "${order[@]}" > "$stage/lib/modules/load-order"
echo "$kver" > "$stage/lib/modules/kernel-version"

# ------------------------------------------------------------------ userland
cp "$bb" "$stage/bin/busybox"
ln -s busybox "$stage/bin/sh"
cp "$here/init.sh" "$stage/init"
chmod 755 "$stage/init"
cp "$here/udhcpc.script" "$stage/etc/udhcpc/default.script"
chmod 755 "$stage/etc/udhcpc/default.script"
# rdate and the libraries it links (ld.so, libc, libbsd, libmd).
cp "$x/usr/sbin/rdate" "$stage/usr/sbin/rdate"
for lib in ld-linux-x86-64.so.2 libc.so.6 libbsd.so.0 libmd.so.0; do
  src=$(find "$x/lib" "$x/usr/lib" -name "$lib" | head -n1)
  [ -n "$src" ] || { log "error: $lib not found in the unpacked packages"; exit 1; }
  cp -L "$src" "$stage/lib/x86_64-linux-gnu/$lib"
done
ln -s ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$stage/lib64/ld-linux-x86-64.so.2"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$stage/etc/passwd"
printf 'root:x:0:\n' > "$stage/etc/group"
printf '127.0.0.1 localhost\n' > "$stage/etc/hosts"
# rdate looks its port up by service name.
printf 'time\t\t37/tcp\ntime\t\t37/udp\nntp\t\t123/udp\n' > "$stage/etc/services"

(cd "$stage" && find . | LC_ALL=C sort | "$bb" cpio -o -H newc 2>/dev/null) | gzip -9 -n > "$work/initramfs.gz"
mv -f "$work/vmlinuz" "$out/vmlinuz"
mv -f "$work/initramfs.gz" "$out/initramfs.gz"
log "built kernel $kver: $out/vmlinuz ($(du -h "$out/vmlinuz" | cut -f1)), $out/initramfs.gz" \
    "($(du -h "$out/initramfs.gz" | cut -f1); modules: ${order[*]}) in $(( $(date +%s) - start ))s"
