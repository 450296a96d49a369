"""snsbus nodes package."""

__all__: list[str] = []
