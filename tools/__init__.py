"""snsbus tools package."""

__all__: list[str] = []
