"""Triton kernels (each module: kernels, a PyTorch reference beside them, an autograd wrapper)."""
