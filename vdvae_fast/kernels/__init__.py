"""Triton kernels, one op per module; imported only when Triton is installed."""
