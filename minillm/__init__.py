"""minillm: a small decoder-only transformer for measuring how position encodings extrapolate."""

__version__ = "0.1.0"
