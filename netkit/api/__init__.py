"""netkit's control API: HTTP/1.1 and JSON over a unix socket.

- ``netkit.api.server``: ``serve_api`` / ``open_api`` run the server inside a running
  switch (same trio thread; every handler is a quick synchronous call into the switch).
- ``netkit.api.client``: ``ApiClient``, a small synchronous client over the socket.
- ``netkit.api.cli``: the ``netkit expose|unexpose|forwards|leases|stats|connections|capture``
  subcommands built on the client.
"""

from .paths import default_api_path

__all__ = ["default_api_path"]
