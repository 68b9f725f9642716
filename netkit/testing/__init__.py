"""Testing kit for netkit users (public, like ``trio.testing``).

Installed as a pytest plugin: the fixtures are described in ``netkit.testing.plugin``.
"""

from .fake_guest import DhcpResult, FakeGuest, attach_fake_guest, random_mac
from .privileged import require_privileged, require_tool

__all__ = ["DhcpResult", "FakeGuest", "attach_fake_guest", "random_mac", "require_privileged", "require_tool"]
