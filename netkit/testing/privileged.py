"""Skip-or-fail rule for tests that need root (namespaces, taps).

Without root a privileged test is skipped with a clear reason; with
``NETKIT_REQUIRE_PRIVILEGED=1`` (as CI sets) the skip becomes a failure, so a
privileged test can never silently stop running.
"""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["require_privileged", "require_tool", "privileged_required"]


def privileged_required() -> bool:
    return os.environ.get("NETKIT_REQUIRE_PRIVILEGED", "") not in ("", "0")


def _skip_or_fail(reason: str) -> None:
    if privileged_required():
        pytest.fail(f"{reason} (NETKIT_REQUIRE_PRIVILEGED=1 forbids skipping)")
    pytest.skip(reason)


def require_privileged() -> None:
    """Call at the top of a test (or fixture) that needs root and /dev/net/tun."""
    if os.geteuid() != 0:
        _skip_or_fail("needs root to create network namespaces and tap devices")
    if not os.path.exists("/dev/net/tun"):
        _skip_or_fail("needs /dev/net/tun")


def require_tool(name: str) -> str:
    """Return the path of a command-line tool, or skip/fail when it is missing."""
    path = shutil.which(name)
    if path is None:
        _skip_or_fail(f"needs the {name!r} command (make test installs it when run as root)")
    return path  # type: ignore[return-value]
