"""A Linux tap device as a link, optionally with virtio-net offloads.

With ``offload=True`` the tap is opened with ``IFF_VNET_HDR`` and told (``TUNSETOFFLOAD``)
that we accept partial checksums and TSO, so the kernel on the other side may hand us
~64 KiB TCP segments ("GSO frames") and accepts the same from us. Every frame read or
written then starts with a 10-byte ``struct virtio_net_hdr`` (host byte order)::

    u8 flags, u8 gso_type, u16 hdr_len, u16 gso_size, u16 csum_start, u16 csum_offset

``receive_batch`` strips it; ``send(frame, TxOffload(...))`` builds it.

A tap netkit creates gets a stable MAC (``stable_tap_mac``: derived from its name and
namespace) instead of the kernel's random one: the tap is the guest's interface, and the
guest's MAC is its identity in the lease table, so a restarted switch (``--state``)
gives the same tap the same address again.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import fcntl
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import trio

from .base import DEFAULT_SEND_QUEUE_BYTES, Frame, Link, LinkClosed, TxOffload
from ._util import MAX_BATCH_FRAMES, logger

__all__ = [
    "TapLink",
    "stable_tap_mac",
    "VnetHeader",
    "VNET_HDR_LEN",
    "VIRTIO_NET_HDR_F_NEEDS_CSUM",
    "VIRTIO_NET_HDR_F_DATA_VALID",
    "VIRTIO_NET_HDR_GSO_NONE",
    "VIRTIO_NET_HDR_GSO_TCPV4",
    "VIRTIO_NET_HDR_GSO_UDP",
    "VIRTIO_NET_HDR_GSO_TCPV6",
    "VIRTIO_NET_HDR_GSO_ECN",
    "encode_vnet_header",
    "decode_vnet_header",
]

# <linux/if_tun.h>
_TUNSETIFF = 0x400454CA
_TUNSETOFFLOAD = 0x400454D0
_TUNGETIFF = 0x800454D2
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_TUN_F_CSUM = 0x01
_TUN_F_TSO4 = 0x02
_TUN_F_TSO6 = 0x04
# <linux/sockios.h>
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_SIOCSIFMTU = 0x8922
_SIOCSIFHWADDR = 0x8924
_ARPHRD_ETHER = 1
_SIOCSIFTXQLEN = 0x8943
#: The guest's transmit queue towards netkit. The kernel default (1000 frames) overflows
#: when a guest bursts thousands of SYNs (a port scan, a connection storm) faster than a
#: userspace reader drains it; lost SYNs then wait a second for the guest's retry.
TAP_TX_QUEUE_LEN = 10000
_IFF_UP = 0x1
_IFNAMSIZ = 16
_CLONE_NEWNET = 0x40000000

# <linux/virtio_net.h>
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80

# The header is in the host's byte order (little-endian on every host netkit runs on;
# "=" says "native" without alignment padding).
_VNET_HDR = struct.Struct("=BBHHHH")
VNET_HDR_LEN = _VNET_HDR.size  # 10
_ZERO_VNET_HDR = bytes(VNET_HDR_LEN)

#: Read buffer: the largest GSO frame (64 KiB IP packet + Ethernet + VLAN) plus the
#: virtio header, with headroom.
_READ_SIZE = 65536 + 1024


@dataclass(frozen=True, slots=True)
class VnetHeader:
    """A decoded ``struct virtio_net_hdr``."""

    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)


def encode_vnet_header(offload: TxOffload | None) -> bytes:
    """The virtio-net header for a frame we send (all zero: a plain, complete frame)."""
    if offload is None:
        return _ZERO_VNET_HDR
    flags = VIRTIO_NET_HDR_F_NEEDS_CSUM if (offload.csum_start or offload.csum_offset) else 0
    return _VNET_HDR.pack(flags, offload.gso_type, offload.hdr_len, offload.gso_size,
                          offload.csum_start, offload.csum_offset)


def decode_vnet_header(data: bytes | bytearray | memoryview) -> VnetHeader:
    """Decode the first 10 bytes of ``data``; raises ``ValueError`` if too short."""
    if len(data) < VNET_HDR_LEN:
        raise ValueError(f"virtio-net header needs {VNET_HDR_LEN} bytes, got {len(data)}")
    return VnetHeader(*_VNET_HDR.unpack_from(data, 0))


def _ifreq(name: str, flags: int = 0) -> bytes:
    encoded = name.encode()
    if not encoded or len(encoded) >= _IFNAMSIZ:
        raise ValueError(f"interface name must be 1..{_IFNAMSIZ - 1} bytes: {name!r}")
    # struct ifreq: 16-byte name, then a union whose first member we use (short flags
    # or int mtu); 40 bytes in all.
    return struct.pack("16sH22x", encoded, flags)


@contextmanager
def _in_netns(netns: str | None) -> Iterator[None]:
    """Run the body with this thread in network namespace ``netns`` (name or path).

    The tap is created *inside* the namespace instead of being moved there afterwards:
    no ``ip`` subprocess, and the name only has to be unique in that namespace. Only the
    calling thread switches, and only for the (synchronous) body, so no other trio task
    ever runs in the wrong namespace.
    """
    if netns is None:
        yield
        return
    path = netns if "/" in netns else os.path.join("/run/netns", netns)
    libc = ctypes.CDLL(None, use_errno=True)
    target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(target)
        raise
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into network namespace {netns!r}: {os.strerror(err)}")
        try:
            yield
        finally:
            if libc.setns(original, _CLONE_NEWNET) != 0:  # pragma: no cover - should not happen
                err = ctypes.get_errno()
                raise OSError(err, "could not return to the original network namespace")
    finally:
        os.close(original)
        os.close(target)


def stable_tap_mac(name: str, netns: str | None = None) -> bytes:
    """A locally administered unicast MAC derived from a tap's name and namespace: the
    same tap gets the same MAC every time netkit creates it."""
    digest = hashlib.sha256(f"netkit-tap\0{netns or ''}\0{name}".encode()).digest()
    return bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]


def _configure_interface(name: str, mtu: int, mac: bytes | None = None) -> None:
    """Set the MAC and MTU and bring the interface up (in the current thread's namespace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
        if mac is not None:
            fcntl.ioctl(ctl, _SIOCSIFHWADDR, struct.pack("16sH6s8x", name.encode(), _ARPHRD_ETHER, mac))
        fcntl.ioctl(ctl, _SIOCSIFMTU, struct.pack("16si20x", name.encode(), mtu))
        fcntl.ioctl(ctl, _SIOCSIFTXQLEN, struct.pack("16si20x", name.encode(), TAP_TX_QUEUE_LEN))
        current = fcntl.ioctl(ctl, _SIOCGIFFLAGS, _ifreq(name))
        flags = struct.unpack_from("16sH", current)[1]
        fcntl.ioctl(ctl, _SIOCSIFFLAGS, _ifreq(name, flags | _IFF_UP))


class TapLink(Link):
    """A link over a tap device fd (``/dev/net/tun`` with ``IFF_TAP | IFF_NO_PI``).

    ``TapLink.create(name, netns=..., offload=..., mtu=...)`` makes a new tap (in the
    given existing network namespace, by name from ``ip netns`` or by path), sets its MTU
    and brings it up; closing the link removes the tap. ``TapLink.adopt(fd)`` wraps an fd
    opened elsewhere. When ``offload`` is true, received frames may exceed the MTU and
    carry partial checksums, and ``send`` honours ``TxOffload``.
    """

    #: The guest's kernel wrote every frame: checksums are valid (or partial, with offloads).
    checksums_trusted = True

    def __init__(
        self,
        fd: int,
        *,
        name: str,
        offload: bool = False,
        mtu: int | None = None,
        send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES,
    ) -> None:
        super().__init__(send_queue_bytes=send_queue_bytes)
        self.name = name
        self.offload = offload
        self.mtu = mtu
        #: The guest interface's MAC when netkit created the tap (None for an adopted fd).
        self.mac: bytes | None = None
        self._fd = fd
        self._eof = False
        os.set_blocking(fd, False)

    @classmethod
    def create(
        cls,
        name: str,
        *,
        netns: str | None = None,
        offload: bool = False,
        mtu: int = 1500,
        mac: bytes | None = None,
        send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES,
    ) -> "TapLink":
        """Create tap ``name`` (inside ``netns`` if given), set its MAC (``mac``, by
        default ``stable_tap_mac(name, netns)``) and ``mtu``, bring it up."""
        if mac is None:
            mac = stable_tap_mac(name, netns)
        elif len(mac) != 6 or mac[0] & 1:
            raise ValueError("mac: must be a 6-byte unicast MAC")
        flags = _IFF_TAP | _IFF_NO_PI | (_IFF_VNET_HDR if offload else 0)
        with _in_netns(netns):
            # The tun fd's namespace is fixed when /dev/net/tun is opened; the device is
            # created in that namespace.
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                fcntl.ioctl(fd, _TUNSETIFF, _ifreq(name, flags))
                if offload:
                    fcntl.ioctl(fd, _TUNSETOFFLOAD, _TUN_F_CSUM | _TUN_F_TSO4 | _TUN_F_TSO6)
                _configure_interface(name, mtu, mac)
            except BaseException:
                os.close(fd)
                raise
        label = f"tap:{netns}/{name}" if netns else f"tap:{name}"
        link = cls(fd, name=label, offload=offload, mtu=mtu, send_queue_bytes=send_queue_bytes)
        link.mac = mac
        return link

    @classmethod
    def adopt(
        cls,
        fd: int,
        *,
        offload: bool = False,
        name: str = "tap",
        mtu: int | None = None,
        send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES,
    ) -> "TapLink":
        """Wrap a tap fd opened elsewhere (the link owns it from now on).

        ``offload`` must match how the fd was opened: true only if it has
        ``IFF_VNET_HDR`` (checked when the fd is a tun device). The caller is responsible
        for ``TUNSETOFFLOAD``.
        """
        try:
            ifr = fcntl.ioctl(fd, _TUNGETIFF, bytes(40))
        except OSError:
            pass  # not a tun fd (a test double such as a datagram socketpair): trust the caller
        else:
            has_vnet = bool(struct.unpack_from("16sH", ifr)[1] & _IFF_VNET_HDR)
            if has_vnet != offload:
                raise ValueError(f"offload={offload} but the tap fd was opened "
                                 f"{'with' if has_vnet else 'without'} IFF_VNET_HDR")
        return cls(fd, name=name, offload=offload, mtu=mtu, send_queue_bytes=send_queue_bytes)

    def fileno(self) -> int:
        return self._fd

    # ----- receiving -----
    async def _receive_batch(self) -> list[Frame]:
        await trio.lowlevel.checkpoint()
        while True:
            frames = self._read_available()
            if frames:
                return frames
            if self._closed or self._eof:
                raise LinkClosed(self.name)
            try:
                await trio.lowlevel.wait_readable(self._fd)
            except (trio.ClosedResourceError, OSError):
                raise LinkClosed(self.name) from None

    def _read_available(self) -> list[Frame]:
        frames: list[Frame] = []
        strip = VNET_HDR_LEN if self.offload else 0
        while len(frames) < MAX_BATCH_FRAMES:
            try:
                data = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.EMSGSIZE, errno.EFAULT, errno.ENOBUFS, errno.ENOMEM):
                    self.stats.receive_errors += 1  # one bad read, not the end of the device
                    continue
                # EBADFD/EIO/ENODEV: the device is gone (e.g. its namespace was deleted).
                logger.info("%s: read failed, closing: %s", self.name, e)
                if frames:
                    break
                raise LinkClosed(self.name) from e
            if not data:
                # Never from a tap; from a stream/seqpacket test double it means EOF.
                self._eof = True
                break
            if len(data) <= strip:
                self.stats.receive_errors += 1
                continue
            # With offloads the header is dropped here; the frame may be a GSO frame with
            # a partial checksum, which ``self.offload`` tells the layers above.
            frames.append(data[strip:] if strip else data)
        return frames

    # ----- sending -----
    def _try_send(self, frame: Frame, offload: TxOffload | None) -> bool:
        try:
            if self.offload:
                # One writev is one packet to tun: header and frame without a copy.
                os.writev(self._fd, (encode_vnet_header(offload), frame))
            else:
                os.write(self._fd, frame)
        except BlockingIOError:
            return False
        return True

    async def _wait_send_ready(self) -> None:
        await trio.lowlevel.wait_writable(self._fd)

    # ----- lifecycle -----
    async def _close(self) -> None:
        trio.lowlevel.notify_closing(self._fd)
        os.close(self._fd)  # a non-persistent tap disappears with its last fd
        await trio.lowlevel.checkpoint()
