"""snsbus manager package."""

__all__: list[str] = []
