"""Where the control API socket lives when no path is given."""

from __future__ import annotations

import os

__all__ = ["default_api_path", "API_PATH_ENV", "API_TOKEN_ENV", "DEFAULT_PATH_HELP"]

#: Environment variable that overrides the default socket path (daemon and client).
API_PATH_ENV = "NETKIT_API"
#: Environment variable holding the bearer token (daemon and client), if any.
API_TOKEN_ENV = "NETKIT_API_TOKEN"

DEFAULT_PATH_HELP = ("$NETKIT_API if set; else /run/netkit/api.sock for root, "
                     "$XDG_RUNTIME_DIR/netkit/api.sock for other users (/tmp/netkit-UID/api.sock "
                     "without XDG_RUNTIME_DIR)")


def default_api_path(environ: dict[str, str] | None = None, euid: int | None = None) -> str:
    """The API socket path used when ``--api`` is given without a value (and by the client)."""
    environ = os.environ if environ is None else environ
    explicit = environ.get(API_PATH_ENV)
    if explicit:
        return explicit
    euid = os.geteuid() if euid is None else euid
    if euid == 0:
        return "/run/netkit/api.sock"
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "netkit", "api.sock")
    return f"/tmp/netkit-{euid}/api.sock"
