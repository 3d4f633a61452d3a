"""ilstore_compare: compare two ilstore runs (any backends)."""
