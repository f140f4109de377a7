"""gallop_kernels: GaLLoP sparse fine-tuning (arXiv 2510.19778) with fast kernels.

select_mask scores every trainable weight (|g| / (|theta| + eps) by default) and
keeps exactly round(rho * N) of them; SparseAdamW trains only those.
"""

import importlib

__version__ = "0.1.0"

# name -> the module that defines it. The names load on first use (PEP 562), so importing the
# package, as the `gallop` command does for --help and argument errors, does not import torch.
_PUBLIC = {
    "CRITERIA": ".criteria",
    "Reselector": ".reselector",
    "SCOPES": ".reference",
    "Selection": ".select",
    "SparseAdamW": ".optim",
    "backends": "._env",
    "estimate_gradients": ".estimate",
    "memory_plan": ".memory",
    "select_mask": ".select",
    "why_unavailable": "._env",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    else:  # a submodule (gk.reference, gk.radix, ...), as after an eager import of the package
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
