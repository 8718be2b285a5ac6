"""vdvae_fast: fast, memory-lean very deep VAEs for PyTorch."""

from . import ops, reference

__all__ = ["ops", "reference"]
__version__ = "0.1.0"
