"""Links: carriers of whole Ethernet frames between a guest and the switch.

See ``netkit.links.base`` for the contract every link implements.
"""

from .base import DEFAULT_SEND_QUEUE_BYTES, Link, LinkClosed, LinkStatistics, TxOffload
from .memory import MemoryLink, memory_link_pair
from .middleware import (
    CaptureStatistics,
    CountingFilter,
    FaultCounts,
    FaultInjector,
    FaultStatistics,
    FilterStatistics,
    LinkWrapper,
    PcapCapture,
    PcapWriter,
)
from .qemu import QemuListener, qemu_connect
from .stdio import StdioLink
from .stream import StreamFramedLink, StreamListener
from .tap import TapLink, VnetHeader, decode_vnet_header, encode_vnet_header
from .vfkit import VfkitLink
from .vpnkit import (
    AllocationError,
    VpnkitHandshakeError,
    VpnkitLink,
    VpnkitListener,
    VpnkitListenerStatistics,
    vpnkit_connect,
)
from .vsock import VsockListener, VsockUnavailable, open_vsock_listener

__all__ = [
    "DEFAULT_SEND_QUEUE_BYTES",
    "Link",
    "LinkClosed",
    "LinkStatistics",
    "TxOffload",
    "MemoryLink",
    "memory_link_pair",
    "TapLink",
    "VnetHeader",
    "encode_vnet_header",
    "decode_vnet_header",
    "StreamFramedLink",
    "StreamListener",
    "QemuListener",
    "qemu_connect",
    "VfkitLink",
    "VpnkitLink",
    "VpnkitListener",
    "VpnkitListenerStatistics",
    "vpnkit_connect",
    "AllocationError",
    "VpnkitHandshakeError",
    "StdioLink",
    "VsockListener",
    "VsockUnavailable",
    "open_vsock_listener",
    "LinkWrapper",
    "PcapCapture",
    "PcapWriter",
    "CaptureStatistics",
    "FaultInjector",
    "FaultStatistics",
    "FaultCounts",
    "CountingFilter",
    "FilterStatistics",
]
