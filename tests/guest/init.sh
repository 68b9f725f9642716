#!/bin/sh
# /init of the netkit test guest (busybox, in the initramfs built by build.sh).
#
# Brings eth0 up with DHCP from netkit, then, when the kernel command line has
# netkit.test=1, runs one check per netkit service and prints one marker line per step
# to the console:
#
#   NETKIT-STEP <step> ok <detail>      NETKIT-STEP <step> fail <why>
#   NETKIT-STEP <step> skip <why>       NETKIT-DONE pass=N fail=M
#
# Steps: boot modules link dhcp ping dns http sntp 9p-mount 9p-read 9p-write.
# (busybox sh runs its own applets before PATH, hence /usr/sbin/rdate spelled out.)
# Kernel command line parameters (all optional):
#
#   netkit.test=1            run the steps, then power off (otherwise: a shell on the console)
#   netkit.steps=a,b,...     only these steps (default: all; boot/modules/link/dhcp always run)
#   netkit.name=HOST         name the dns step resolves (default host.docker.internal)
#   netkit.url=URL           what the http step fetches (busybox wget)
#   netkit.ntp=IP            SNTP server (default: DHCP option 42, else the gateway)
#   netkit.share=NAME        9P share (aname) to mount from the gateway, TCP port 564
#   netkit.file=NAME         file in the share the 9p-read step prints (default hello.txt)
#   netkit.9popts=OPTS       extra 9p mount options (comma separated)
#   netkit.9pserver=IP       9P server (default: the gateway); netkit.9pport=N (default 564)
#   netkit.timeout=SEC       power off after SEC seconds whatever happens
#   netkit.shell=1           after the steps, open a shell instead of powering off
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
/bin/busybox --install -s /bin 2>/dev/null

mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
# Keep kernel messages from cutting through the marker lines (dmesg still has them).
dmesg -n 1

NK_TEST= NK_STEPS=all NK_NAME=host.docker.internal NK_URL= NK_NTP= NK_SHARE= NK_FILE=hello.txt
NK_9POPTS= NK_9PSERVER= NK_9PPORT=564 NK_TIMEOUT= NK_SHELL=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    netkit.test=*) NK_TEST=${arg#*=} ;;
    netkit.steps=*) NK_STEPS=${arg#*=} ;;
    netkit.name=*) NK_NAME=${arg#*=} ;;
    netkit.url=*) NK_URL=${arg#*=} ;;
    netkit.ntp=*) NK_NTP=${arg#*=} ;;
    netkit.share=*) NK_SHARE=${arg#*=} ;;
    netkit.file=*) NK_FILE=${arg#*=} ;;
    netkit.9popts=*) NK_9POPTS=${arg#*=} ;;
    netkit.9pserver=*) NK_9PSERVER=${arg#*=} ;;
    netkit.9pport=*) NK_9PPORT=${arg#*=} ;;
    netkit.timeout=*) NK_TIMEOUT=${arg#*=} ;;
    netkit.shell=*) NK_SHELL=${arg#*=} ;;
  esac
done

PASS=0 FAIL=0
oneline() { tr '\r\n\t' '   ' | sed 's/  */ /g; s/^ //; s/ $//' | cut -c1-300; }
ok()   { PASS=$((PASS + 1)); echo "NETKIT-STEP $1 ok${2:+ $2}"; }
fail() { FAIL=$((FAIL + 1)); echo "NETKIT-STEP $1 fail${2:+ $2}"; }
skip() { echo "NETKIT-STEP $1 skip${2:+ $2}"; }
want() { case ",$NK_STEPS," in *,all,*|*,"$1",*) return 0 ;; esac; return 1; }
finish() {
  echo "NETKIT-DONE pass=$PASS fail=$FAIL uptime $(cut -d' ' -f1 /proc/uptime)s"
  if [ -z "$NK_TEST" ] || [ "$NK_SHELL" = 1 ]; then
    echo "netkit guest: shell on the console; 'exit' powers off"
    setsid cttyhack sh -l
  fi
  sync
  poweroff -f
  echo o > /proc/sysrq-trigger
  sleep 5
}

if [ -n "$NK_TIMEOUT" ]; then
  (sleep "$NK_TIMEOUT"; echo "NETKIT-TIMEOUT after ${NK_TIMEOUT}s"; sync; poweroff -f) &
fi

echo  # the BIOS leaves the cursor mid-line; start the markers on a fresh one
ok boot "kernel $(uname -r) uptime $(cut -d' ' -f1 /proc/uptime)s"

# ------------------------------------------------------------------ modules
loaded= bad=
for m in $(cat /lib/modules/load-order); do
  if insmod "/lib/modules/$m.ko" 2>/tmp/insmod.err; then
    loaded="$loaded $m"
  else
    bad="$bad $m($(oneline </tmp/insmod.err))"
  fi
done
if [ -z "$bad" ]; then ok modules "${loaded# }"; else fail modules "${bad# }"; fi

# ------------------------------------------------------------------ link
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do usleep 50000; i=$((i + 1)); done
ip link set lo up
if [ ! -e /sys/class/net/eth0 ]; then
  fail link "no eth0 (interfaces: $(ls /sys/class/net | oneline))"
  finish
fi
ip link set eth0 up
ok link "eth0 $(cat /sys/class/net/eth0/address)"

# ------------------------------------------------------------------ dhcp
if timeout 30 udhcpc -i eth0 -f -q -n -t 5 -T 2 -O mtu -O ntpsrv -O search \
     -s /etc/udhcpc/default.script >/tmp/udhcpc.log 2>&1 && [ -s /run/lease ]; then
  . /run/lease
  ok dhcp "$lease_ip/$lease_mask router $lease_router dns $lease_dns mtu ${lease_mtu:-unset} ntp ${lease_ntp:-unset}"
else
  fail dhcp "$(tail -n 3 /tmp/udhcpc.log | oneline)"
  finish
fi
GW=${lease_router%% *}
GW=${GW:-192.168.65.1}
echo "netkit guest: eth0 $lease_ip, gateway $GW"
[ -z "$NK_TEST" ] && finish

# ------------------------------------------------------------------ ping
if want ping; then
  if out=$(ping -c 1 -W 3 "$GW" 2>&1); then
    ok ping "$GW $(echo "$out" | grep -o 'time=[^ ]* *ms' | head -n1)"
  else
    fail ping "$GW $(echo "$out" | tail -n 2 | oneline)"
  fi
fi

# ------------------------------------------------------------------ dns
if want dns; then
  out=$(timeout 8 nslookup "$NK_NAME" 2>&1)
  addr=$(echo "$out" | awk '/^Name:/ {n = 1; next} n && /^Address/ {print $NF; exit}')
  if [ -n "$addr" ]; then
    ok dns "$NK_NAME $addr"
  else
    fail dns "$NK_NAME: $(echo "$out" | oneline)"
  fi
fi

# ------------------------------------------------------------------ http
if want http; then
  if [ -z "$NK_URL" ]; then
    skip http "no netkit.url"
  elif timeout 20 wget -q -O /tmp/http.out "$NK_URL" 2>/tmp/wget.err; then
    ok http "$(head -c 300 /tmp/http.out | oneline)"
  else
    fail http "$NK_URL: exit $? $(oneline </tmp/wget.err)"
  fi
fi

# ------------------------------------------------------------------ sntp
if want sntp; then
  ntp=${NK_NTP:-${lease_ntp%% *}}
  ntp=${ntp:-$GW}
  if out=$(timeout 10 /usr/sbin/rdate -n -p -v "$ntp" 2>&1); then
    ok sntp "$ntp $(echo "$out" | oneline)"
  else
    fail sntp "$ntp: $(echo "$out" | oneline)"
  fi
fi

# ------------------------------------------------------------------ 9p
if want 9p-mount || want 9p-read || want 9p-write; then
  if [ -z "$NK_SHARE" ]; then
    skip 9p-mount "no netkit.share"; skip 9p-read "no share"; skip 9p-write "no share"
  else
    mkdir -p /mnt/share
    server=${NK_9PSERVER:-$GW}
    opts="trans=tcp,port=$NK_9PPORT,version=9p2000.L,aname=$NK_SHARE${NK_9POPTS:+,$NK_9POPTS}"
    if timeout 15 mount -t 9p -o "$opts" "$server" /mnt/share 2>/tmp/mount.err; then
      ok 9p-mount "$NK_SHARE on $server:$NK_9PPORT"
      if want 9p-read; then
        if out=$(timeout 10 cat "/mnt/share/$NK_FILE" 2>&1); then
          ok 9p-read "$(echo "$out" | oneline)"
        else
          fail 9p-read "$NK_FILE: $(echo "$out" | oneline)"
        fi
      fi
      if want 9p-write; then
        text="written by netkit guest $lease_ip"
        if timeout 10 sh -c 'echo "$1" > /mnt/share/from-guest.txt && sync' _ "$text" 2>/tmp/write.err \
           && [ "$(timeout 10 cat /mnt/share/from-guest.txt 2>/dev/null)" = "$text" ]; then
          ok 9p-write "from-guest.txt"
        else
          fail 9p-write "from-guest.txt: $(oneline </tmp/write.err)"
        fi
      fi
      timeout 10 umount /mnt/share
    else
      fail 9p-mount "$NK_SHARE on $server:$NK_9PPORT: exit $? $(oneline </tmp/mount.err)"
      want 9p-read && skip 9p-read "not mounted"
      want 9p-write && skip 9p-write "not mounted"
    fi
  fi
fi

finish
