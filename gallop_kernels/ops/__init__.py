"""Triton kernels: kernel, launcher and entry point together, one module per op family."""
