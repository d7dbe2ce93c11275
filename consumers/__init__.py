"""The other readers of the token stream: audit and analytics (not built yet)."""
