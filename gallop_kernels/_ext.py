"""Loads the compiled extension gallop_kernels._C, remembering why it failed."""

from __future__ import annotations

import os

_IMPORT_ERROR: BaseException | None = None
_C = None
if os.environ.get("GALLOP_KERNELS_DISABLE_EXT") == "1":
    _IMPORT_ERROR = RuntimeError("disabled by GALLOP_KERNELS_DISABLE_EXT=1")
else:
    try:
        from gallop_kernels import _C  # noqa: F811
    except ImportError as e:  # not built: the reference path still works
        _IMPORT_ERROR = e


def require_ext(op: str):
    """The extension module, or a RuntimeError saying why ``op`` cannot run."""
    if _C is None:
        raise RuntimeError(
            f"{op} needs the compiled extension gallop_kernels._C, which failed to import "
            f"({_IMPORT_ERROR}). Rebuild with: pip install --no-build-isolation -e ."
        )
    return _C
