"""Optimizers: SparseAdamW (AdamW on the selected weights only, O(k) state)."""

from .sparse_adamw import SparseAdamW

__all__ = ["SparseAdamW"]
