"""Driftless data plane: segment store, indexes, adapters and the runtime service."""

__version__ = "0.1.0"
