"""Sparse deltas: the weights a sparse fine-tuning run changed, saved as safetensors.

Per parameter ``name`` the file holds ``name.indices`` (sorted flat indices into
``param.reshape(-1)``: int32 when they fit, int64 otherwise) and ``name.values``
(the tuned values, in the parameter's dtype, so applying them is exact). The
metadata says which selection made it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..distributed import scatter_

INT32_MAX = 2**31 - 1


def make_delta(model: torch.nn.Module, selection) -> dict[str, torch.Tensor]:
    """The tensors of a delta: the current values of ``model`` at the selected indices."""
    params = dict(model.named_parameters())
    out = {}
    for name, idx in selection.items():
        if idx.numel() == 0:
            continue
        flat = params[name].detach().reshape(-1)
        small = flat.numel() <= INT32_MAX
        out[f"{name}.indices"] = idx.to(torch.int32 if small else torch.int64).cpu().contiguous()
        out[f"{name}.values"] = flat[idx].cpu().contiguous()
    return out


def save_delta(path: str | Path, model: torch.nn.Module, selection, metadata: dict | None = None) -> int:
    """Write the delta of ``model`` over ``selection`` to ``path``; returns the file size in bytes."""
    from safetensors.torch import save_file

    meta = {"format": "gallop-delta-v1", "info": json.dumps(metadata or {})}
    save_file(make_delta(model, selection), str(path), metadata=meta)
    return Path(path).stat().st_size


def load_delta(path: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """({name: (indices, values)}, metadata) from a delta file; ValueError if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != "gallop-delta-v1":
        raise ValueError(f"{path}: not a gallop delta (metadata format {meta.get('format')!r})")
    names = {k.rsplit(".", 1)[0] for k in tensors}
    delta = {}
    for n in sorted(names):
        if f"{n}.indices" not in tensors or f"{n}.values" not in tensors:
            raise ValueError(f"{path}: parameter {n!r} lacks its indices or values")
        delta[n] = (tensors[f"{n}.indices"].long(), tensors[f"{n}.values"])
    return delta, json.loads(meta.get("info", "{}"))


@torch.no_grad()
def apply_delta(model: torch.nn.Module, delta: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write the delta's values into ``model`` in place; checks names, ranges and dtypes first."""
    params = dict(model.named_parameters())
    for name, (idx, values) in delta.items():
        if name not in params:
            raise ValueError(f"delta parameter {name!r} is not in the model")
        p = params[name]
        if idx.numel() != values.numel():
            raise ValueError(f"delta parameter {name!r}: {idx.numel()} indices but {values.numel()} values")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= p.numel()):
            raise ValueError(f"delta parameter {name!r}: index out of range for {p.numel()} weights")
        if values.dtype != p.dtype:
            raise ValueError(f"delta parameter {name!r}: values are {values.dtype}, the model's weights {p.dtype}")
    for name, (idx, values) in delta.items():
        p = params[name]
        scatter_(p, idx.to(p.device), values.to(p.device))
