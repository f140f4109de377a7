"""Kernels and their launchers, one module per op family: Triton selection (select_triton)
and the CUDA sparse AdamW launcher (sparse_adamw, calling gallop_kernels._C)."""
