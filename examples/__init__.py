"""Ready-to-deploy snsbus examples."""
