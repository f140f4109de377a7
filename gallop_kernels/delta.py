"""Sparse deltas: what a sparse fine-tuning run changed, as differences from its base model.

Works on any ``nn.Module`` whose parameters were selected with ``select_mask``::

    sel = select_mask(model, grads, rho=0.01)
    base = selected_values(model, sel)        # before training
    ...                                       # train with SparseAdamW
    save_delta("task.safetensors", make_delta(model, sel, base, info={"task": "arc_easy"}))
    apply_delta(other_copy_of_the_base, load_delta("task.safetensors"))

A delta file (safetensors, metadata ``format = gallop-delta-v2``) holds per tuned parameter ``name``:

- ``name.indices``: the sorted flat indices into ``param.reshape(-1)``; int32, int64 when the
  parameter has 2^31 weights or more;
- ``name.diff``: ``tuned - base`` at those indices, in float32;
- ``name.exact_at``, ``name.exact_base``, ``name.exact_tuned``, only for the rare weights whose
  values do not survive the float32 round trip (see below): their positions in ``name.indices``
  and their exact base and tuned values in the weight dtype;

and in the metadata the shapes, a ``base`` and a ``tuned`` fingerprint (SHA-256 over the names,
shapes, indices and the values at those indices before and after tuning) and ``info`` (JSON).

Exactness: applying computes ``w = dtype(float32(w) + diff)``, subtracting ``dtype(float32(w) - diff)``
(float64 for float64 weights). For bf16 and fp16 weights this gives the tuned (base) values back
exactly unless one of the two values is more than about 2^16 times the other, because the
float32 difference of two such numbers is exact. For float32 weights the difference rounds when
training moved a weight by more than a factor of 2 or across 0; float64 weights round nearly
always. Every weight whose round trip is not exact in either direction is stored in the
``exact_*`` tensors, and apply and subtract write those values whenever the model holds the
expected starting value, so both directions are bit for bit.

Composition: deltas add. A delta's base fingerprint covers only the base values at its own
indices, so a second delta (another task) applies after a first one as long as they share no
weight. Where they share weights (GaLLoP often picks the same exact-zero weights for different
tasks) the second's fingerprint no longer matches: ``apply_delta`` refuses unless ``force=True``,
and then a shared weight becomes ``base + d1 + d2`` (each addition in float32, rounded to the
weight dtype). ``gallop apply`` with several ``--delta`` files checks each against the base
first, then adds them in order. Subtracting checks the tuned fingerprint: it removes, bit for
bit, a delta whose tuned values the model holds (alone, or with deltas that share no weight with
it, in any order). Where applied deltas share weights no tuned fingerprint matches; with
``force=True`` the differences come off, and the shared weights are back up to the rounding of
each step.
"""

from __future__ import annotations

import errno
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .distributed import gather, index_dtype, scatter_
from .errors import GallopError

FORMAT = "gallop-delta-v2"


class DeltaError(GallopError):
    """A delta file is unreadable or does not fit the model it is applied to."""


@dataclass
class TensorDelta:
    """One parameter's part of a delta."""

    shape: tuple[int, ...]
    indices: torch.Tensor
    """Sorted flat indices into ``param.reshape(-1)`` (int64 in memory)."""
    diff: torch.Tensor
    """float32 ``tuned - base`` at ``indices``."""
    exact_at: torch.Tensor
    """int64 positions into ``indices`` whose values float32 cannot round-trip (usually empty)."""
    exact_base: torch.Tensor
    """Their base values, in the weight dtype."""
    exact_tuned: torch.Tensor
    """Their tuned values, in the weight dtype."""


@dataclass
class Delta:
    """What a fine-tuning run changed: per parameter name a TensorDelta, and fingerprints of base and tuned values."""

    tensors: dict[str, TensorDelta]
    base_fingerprint: str
    tuned_fingerprint: str
    info: dict

    @property
    def num_weights(self) -> int:
        """How many weights the delta changes (at most)."""
        return sum(int(t.indices.numel()) for t in self.tensors.values())


def selected_values(model: torch.nn.Module, selection) -> dict[str, torch.Tensor]:
    """Copies of ``model``'s values at the selected indices: call before training, pass to :func:`make_delta`."""
    params = dict(model.named_parameters())
    return {name: gather(params[name].detach(), idx).clone() for name, idx in selection.items() if idx.numel()}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor, so comparisons tell -0.0 from 0.0."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _fingerprint(values: dict[str, torch.Tensor], indices: dict[str, torch.Tensor], shapes: dict) -> str:
    """SHA-256 over names, shapes, indices and values (as float64, so the hash does not depend on the weight dtype)."""
    h = hashlib.sha256()
    for name in sorted(values):
        h.update(f"{name}\0{tuple(shapes[name])}\0".encode())
        h.update(indices[name].to(torch.int64).cpu().numpy().tobytes())
        h.update(values[name].detach().to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()


def make_delta(model: torch.nn.Module, selection, base_values: dict[str, torch.Tensor],
               info: dict | None = None) -> Delta:
    """The delta of ``model`` (tuned) from ``base_values`` (:func:`selected_values` before training) over ``selection``."""
    params = dict(model.named_parameters())
    tensors, tuned_values = {}, {}
    for name, base in base_values.items():
        p = params[name].detach()
        idx = selection[name]
        tuned = gather(p, idx)
        work = _compute_dtype(p.dtype)
        diff = (tuned.to(work) - base.to(work)).float()
        forward = (base.to(work) + diff.to(work)).to(p.dtype)
        backward = (tuned.to(work) - diff.to(work)).to(p.dtype)
        inexact = (_bits(forward) != _bits(tuned)) | (_bits(backward) != _bits(base))
        at = inexact.nonzero().reshape(-1)
        tensors[name] = TensorDelta(tuple(p.shape), idx.to(torch.int64).cpu(), diff.cpu(), at.cpu(),
                                    base[at].cpu(), tuned[at].cpu())
        tuned_values[name] = tuned
    indices = {n: t.indices for n, t in tensors.items()}
    shapes = {n: t.shape for n, t in tensors.items()}
    return Delta(tensors, _fingerprint(base_values, indices, shapes), _fingerprint(tuned_values, indices, shapes),
                 dict(info or {}))


def save_delta(path: str | Path, delta: Delta) -> int:
    """Write ``delta`` to ``path`` (safetensors); returns the file size in bytes. OSError when the write fails."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    out = {}
    for name, t in delta.tensors.items():
        out[f"{name}.indices"] = t.indices.to(index_dtype(torch.Size(t.shape).numel())).contiguous()
        out[f"{name}.diff"] = t.diff.contiguous()
        if t.exact_at.numel():
            out[f"{name}.exact_at"] = t.exact_at.contiguous()
            out[f"{name}.exact_base"] = t.exact_base.contiguous()
            out[f"{name}.exact_tuned"] = t.exact_tuned.contiguous()
    meta = {
        "format": FORMAT,
        "shapes": json.dumps({n: list(t.shape) for n, t in delta.tensors.items()}),
        "base_fingerprint": delta.base_fingerprint,
        "tuned_fingerprint": delta.tuned_fingerprint,
        "info": json.dumps(delta.info),
    }
    try:
        save_file(out, str(path), metadata=meta)
    except SafetensorError as e:  # how safetensors reports a failed write (disk full, no permission)
        raise OSError(errno.EIO, str(e), str(path)) from None
    return Path(path).stat().st_size


def load_delta(path: str | Path) -> Delta:
    """The Delta in a file written by :func:`save_delta`; DeltaError if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for missing and damaged files
        raise DeltaError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise DeltaError(f"{path}: not a gallop delta of format {FORMAT} (metadata format {meta.get('format')!r})")
    try:
        shapes = json.loads(meta["shapes"])
        tensors = {}
        for name, shape in shapes.items():
            at = stored.get(f"{name}.exact_at", torch.zeros(0, dtype=torch.int64))
            empty = torch.zeros(0)
            tensors[name] = TensorDelta(tuple(shape), stored[f"{name}.indices"].long(), stored[f"{name}.diff"], at,
                                        stored.get(f"{name}.exact_base", empty), stored.get(f"{name}.exact_tuned", empty))
        return Delta(tensors, meta["base_fingerprint"], meta["tuned_fingerprint"], json.loads(meta.get("info", "{}")))
    except (KeyError, ValueError) as e:
        raise DeltaError(f"{path}: damaged gallop delta (missing or malformed {e})") from None


def _checked_params(model: torch.nn.Module, delta: Delta) -> dict[str, torch.Tensor]:
    """The model's parameters the delta names, after checking names, shapes and index ranges."""
    params = dict(model.named_parameters())
    for name, t in delta.tensors.items():
        if name not in params:
            raise DeltaError(f"delta parameter {name!r} is not in the model")
        p = params[name]
        if tuple(p.shape) != tuple(t.shape):
            raise DeltaError(f"delta parameter {name!r} has shape {tuple(t.shape)}, the model's {tuple(p.shape)}")
        if t.indices.numel() != t.diff.numel():
            raise DeltaError(f"delta parameter {name!r}: {t.indices.numel()} indices but {t.diff.numel()} differences")
        if t.indices.numel() and (int(t.indices.min()) < 0 or int(t.indices.max()) >= p.numel()):
            raise DeltaError(f"delta parameter {name!r}: index out of range for {p.numel()} weights")
        if not t.exact_at.numel() == t.exact_base.numel() == t.exact_tuned.numel():
            raise DeltaError(f"delta parameter {name!r}: its exact_at, exact_base and exact_tuned differ in length")
    return params


def check_delta(model: torch.nn.Module, delta: Delta, *, subtract: bool = False) -> None:
    """Raise DeltaError unless ``model`` is the delta's base (its tuned model with ``subtract``) at the delta's weights."""
    params = _checked_params(model, delta)
    values = {n: gather(params[n].detach(), t.indices.to(params[n].device)) for n, t in delta.tensors.items()}
    indices = {n: t.indices for n, t in delta.tensors.items()}
    shapes = {n: t.shape for n, t in delta.tensors.items()}
    expected = delta.tuned_fingerprint if subtract else delta.base_fingerprint
    if _fingerprint(values, indices, shapes) != expected:
        which = "the tuned model this delta was made from" if subtract else "the base model this delta was made from"
        raise DeltaError(f"the model is not {which}: its values at the delta's {delta.num_weights:,} weights differ "
                         f"(another checkpoint or dtype, or a delta that shares weights applied before); "
                         f"--force (force=True) applies it anyway")


@torch.no_grad()
def apply_delta(model: torch.nn.Module, delta: Delta, *, force: bool = False, subtract: bool = False) -> None:
    """Add the delta's differences to ``model`` in place (remove them with ``subtract``), on any ``nn.Module``.

    Checks names, shapes and index ranges, and that the model holds the delta's base values
    (its tuned values with ``subtract``) at the delta's weights: DeltaError otherwise, unless
    ``force``. Bit for bit when the check passes; see the module docstring for composition.
    """
    params = _checked_params(model, delta)
    if not force:
        check_delta(model, delta, subtract=subtract)
    for name, t in delta.tensors.items():
        p = params[name]
        idx = t.indices.to(p.device)
        current = gather(p.detach(), idx)
        work = _compute_dtype(p.dtype)
        diff = t.diff.to(device=p.device, dtype=work)
        new = (current.to(work) - diff if subtract else current.to(work) + diff).to(p.dtype)
        if t.exact_at.numel():
            at = t.exact_at.to(p.device)
            start, end = (t.exact_tuned, t.exact_base) if subtract else (t.exact_base, t.exact_tuned)
            start, end = start.to(device=p.device, dtype=p.dtype), end.to(device=p.device, dtype=p.dtype)
            hit = _bits(current[at]) == _bits(start)  # only where the model holds the value the pair starts from
            new[at[hit]] = end[hit]
        scatter_(p, idx, new)
