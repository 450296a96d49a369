"""The compiled hot path (``core._fastpath``) and its pure-Python twin.

Import from :mod:`core.fastpath`, never from the twins directly.
"""

__all__ = ["fastpath", "errors"]
