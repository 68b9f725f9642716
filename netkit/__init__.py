"""netkit: a userspace TCP/IP network stack for VMs and network namespaces, on trio."""

from .config import Config, ConfigError, StaticLease

__all__ = ["Config", "ConfigError", "StaticLease"]
__version__ = "0.1.0"

from .runtime import open_switch  # noqa: E402
from .switch import Port, Switch, SwitchError  # noqa: E402

__all__ += ["open_switch", "Port", "Switch", "SwitchError"]
