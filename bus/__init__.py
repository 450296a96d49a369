"""The messaging layer: wire protocol, the sockets of both planes, the overlay tree."""

__all__ = [
    "protocol",
    "planes",
    "SocketFactory",
    "PlaneLoop",
    "PlaneStatistics",
    "LoopStatistics",
    "PlaneError",
    "SocketSetupError",
    "PeerUnreachable",
    "endpoint_of",
    "split_routed",
]

_FROM_PLANES = frozenset(__all__[2:])


def __getattr__(name):
    # Lazy: `import bus.protocol` must not pull in zmq and asyncio.
    if name in _FROM_PLANES:
        from bus import planes

        return getattr(planes, name)
    raise AttributeError(f"module 'bus' has no attribute {name!r}")
