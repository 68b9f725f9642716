#!/usr/bin/env bash
# Install the Debian tools netkit's tests and demo drive, when missing and run as root.
# Usage: scripts/install-debian-tools.sh [test|demo|bench]
set -euo pipefail
set_name=${1:-test}

# command -> Debian package
declare -A demo_tools=([ip]=iproute2 [busybox]=busybox-static [ping]=iputils-ping)
declare -A test_tools=([ip]=iproute2 [busybox]=busybox-static [ping]=iputils-ping [dig]=dnsutils
                       [curl]=curl [iperf3]=iperf3 [qemu-system-x86_64]=qemu-system-x86
                       [ntpdate]=ntpsec-ntpdate [pasta]=passt [slirp4netns]=slirp4netns
                       [unshare]=util-linux [mount]=mount [openssl]=openssl)
declare -A bench_tools=([ip]=iproute2 [busybox]=busybox-static [iperf3]=iperf3 [pasta]=passt
                        [slirp4netns]=slirp4netns [curl]=curl [unshare]=util-linux [mount]=mount)

case "$set_name" in
  demo) declare -n tools=demo_tools ;;
  test) declare -n tools=test_tools ;;
  bench) declare -n tools=bench_tools ;;
  *) echo "usage: $0 [test|demo|bench]" >&2; exit 2 ;;
esac

missing=()
for cmd in "${!tools[@]}"; do
  # busybox alone is not enough: udhcpc needs a busybox that has the applet.
  if [ "$cmd" = busybox ]; then
    busybox udhcpc --help >/dev/null 2>&1 || missing+=("${tools[$cmd]}")
  elif ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ] && [ ! -x "/sbin/$cmd" ]; then
    missing+=("${tools[$cmd]}")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "note: not root, so not installing: ${missing[*]} (tests that need them will skip)" >&2
  exit 0
fi
echo "installing Debian packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
