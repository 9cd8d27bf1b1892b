"""One use case per command family, each read top to bottom (export.py so far; the rest move here later)."""
