"""The messaging layer: wire protocol, the sockets of both planes, the overlay tree."""

__all__ = ["protocol"]
