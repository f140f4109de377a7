"""gallop_kernels: GaLLoP sparse fine-tuning (arXiv 2510.19778) with fast kernels.

select_mask scores every trainable weight (|g| / (|theta| + eps) by default) and
keeps exactly round(rho * N) of them; SparseAdamW trains only those.
"""

from ._env import backends, why_unavailable
from .memory import memory_plan
from .optim import SparseAdamW
from .reference import CRITERIA, SCOPES
from .select import Selection, select_mask

__version__ = "0.1.0"

__all__ = ["CRITERIA", "SCOPES", "Selection", "SparseAdamW", "backends", "memory_plan", "select_mask", "why_unavailable", "__version__"]
