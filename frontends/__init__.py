"""snsbus frontends package."""

__all__: list[str] = []
