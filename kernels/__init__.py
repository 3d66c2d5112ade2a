"""Triton kernels (device code only). Shipped inside the package as ``bpo_fast.kernels``."""
