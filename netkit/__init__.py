"""netkit: a userspace TCP/IP network stack for VMs and network namespaces, on trio."""

from .config import Config, ConfigError, StaticLease

__all__ = ["Config", "ConfigError", "StaticLease"]
__version__ = "0.1.0"
