"""Kernels and their launchers, one module per op family: the Triton selection (score: shared
score/key helpers; select_triton: the window plan's count and emission passes; select_histogram:
its exact fallback) and the CUDA sparse AdamW launcher (sparse_adamw, calling gallop_kernels._C)."""
