"""The one error a wire view may raise."""

__all__ = ["MalformedPacket"]


class MalformedPacket(ValueError):
    """Input bytes are not a valid packet of the expected kind.

    Every ``*_untrusted`` parser raises only this; callers count and drop.
    """
