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
weight dtype). ``gallop apply`` with several ``--delta`` files applies them in that order, each
checked against the model as the ones before it left it (so the same rule: deltas that share
weights need ``--force``), and refuses a delta listed twice. Subtracting checks the tuned
fingerprint: it removes, bit for bit, a delta whose tuned values the model holds (alone, or with
deltas that share no weight with it, in any order). Where applied deltas share weights no tuned
fingerprint matches; with ``force=True`` the differences come off, and the shared weights are
back up to the rounding of each step.

Integrity: :func:`load_delta` refuses a file whose metadata or tensors are malformed (one
DeltaError naming the part) and a difference that is NaN or Inf. Whenever the model holds the
values a delta starts from, :func:`apply_delta` computes the result aside and checks it against
the other fingerprint (tuned when adding, base when subtracting) before writing anything, so a
damaged difference is refused and leaves the model untouched. With ``force=True`` on a model
that does not hold those values there is nothing to check the result against.
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


def _selected_params(model: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    """The model's parameters by name; DeltaError naming a selected parameter the model lacks."""
    params = dict(model.named_parameters())
    for name in names:
        if name not in params:
            raise DeltaError(f"the selection names parameter {name!r}, which the model does not have")
    return params


def selected_values(model: torch.nn.Module, selection) -> dict[str, torch.Tensor]:
    """Copies of ``model``'s values at the selected indices: call before training, pass to :func:`make_delta`."""
    params = _selected_params(model, selection.keys())
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
               info: dict | None = None, tuned_values: dict[str, torch.Tensor] | None = None) -> Delta:
    """The delta of ``model`` (tuned) from ``base_values`` (:func:`selected_values` before training) over ``selection``.

    ``tuned_values`` ({name: values at ``selection[name]``}) replaces reading them from ``model``, whose
    parameters then give only their shapes and dtypes: for a sharded model (FSDP2) whose selected
    values were gathered from every rank."""
    params = _selected_params(model, base_values)
    tensors, tuned_at = {}, {}
    for name, base in base_values.items():
        p = params[name].detach()
        idx = selection[name]
        tuned = gather(p, idx.to(p.device)) if tuned_values is None else tuned_values[name]
        base = base.to(tuned.device)  # base values, indices and tuned values may be kept in host memory
        work = _compute_dtype(p.dtype)
        diff = (tuned.to(work) - base.to(work)).float()
        forward = (base.to(work) + diff.to(work)).to(p.dtype)
        backward = (tuned.to(work) - diff.to(work)).to(p.dtype)
        inexact = (_bits(forward) != _bits(tuned)) | (_bits(backward) != _bits(base))
        at = inexact.nonzero().reshape(-1)
        tensors[name] = TensorDelta(tuple(p.shape), idx.to(torch.int64).cpu(), diff.cpu(), at.cpu(),
                                    base[at].cpu(), tuned[at].cpu())
        tuned_at[name] = tuned
    indices = {n: t.indices for n, t in tensors.items()}
    shapes = {n: t.shape for n, t in tensors.items()}
    return Delta(tensors, _fingerprint(base_values, indices, shapes), _fingerprint(tuned_at, indices, shapes),
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
    """The Delta in a file written by :func:`save_delta`; DeltaError (one line, naming the part) if it is not one,
    if its metadata or tensors are malformed, or if a stored difference is NaN or Inf."""
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
        delta = _from_file(meta, stored)
        _check_structure(delta)
    except DeltaError as e:
        raise DeltaError(f"{path}: damaged gallop delta: {e}") from None
    return delta


def _json_meta(meta: dict, key: str, kind: type, default=None):
    """The metadata entry ``key`` parsed as JSON, which must be a ``kind``; DeltaError otherwise."""
    if key not in meta and default is not None:
        return default
    try:
        value = json.loads(meta[key])
    except KeyError:
        raise DeltaError(f"metadata {key!r} is missing") from None
    except ValueError as e:
        raise DeltaError(f"metadata {key!r} is not valid JSON ({e})") from None
    if not isinstance(value, kind):
        raise DeltaError(f"metadata {key!r} must be a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def _shape(name: str, shape) -> tuple[int, ...]:
    """A parameter's shape from the metadata: a list of integers >= 0."""
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise DeltaError(f"metadata shape of {name!r} must be a list of integers >= 0, got {shape!r}")
    return tuple(shape)


def _fingerprint_meta(meta: dict, key: str) -> str:
    value = meta.get(key)
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise DeltaError(f"metadata {key!r} must be a SHA-256 hex digest, got {value!r}")
    return value


def _from_file(meta: dict, stored: dict[str, torch.Tensor]) -> Delta:
    """The Delta that the metadata and tensors of a delta file describe (shapes and names checked)."""
    shapes = _json_meta(meta, "shapes", dict)
    info = _json_meta(meta, "info", dict, default={})
    names = {f"{n}.{part}" for n in shapes for part in ("indices", "diff", "exact_at", "exact_base", "exact_tuned")}
    extra = sorted(set(stored) - names)
    if extra:
        raise DeltaError(f"tensor {extra[0]!r} belongs to no parameter of the metadata 'shapes'")
    tensors = {}
    for name, shape in shapes.items():
        for part in ("indices", "diff"):
            if f"{name}.{part}" not in stored:
                raise DeltaError(f"tensor {name + '.' + part!r} is missing")
        exact = [stored.get(f"{name}.{part}") for part in ("exact_at", "exact_base", "exact_tuned")]
        if any(t is None for t in exact) and any(t is not None for t in exact):
            raise DeltaError(f"{name!r} has only some of exact_at, exact_base and exact_tuned")
        at, exact_base, exact_tuned = exact if exact[0] is not None else (torch.zeros(0, dtype=torch.int64),
                                                                          torch.zeros(0), torch.zeros(0))
        tensors[name] = TensorDelta(_shape(name, shape), stored[f"{name}.indices"], stored[f"{name}.diff"], at,
                                    exact_base, exact_tuned)
    return Delta(tensors, _fingerprint_meta(meta, "base_fingerprint"), _fingerprint_meta(meta, "tuned_fingerprint"),
                 info)


def _check_structure(delta: Delta) -> None:
    """DeltaError unless every TensorDelta is well formed: 1-D tensors of matching lengths and dtypes, indices
    strictly increasing inside the shape, finite float32 differences, exact positions inside the indices.

    Integer indices are converted to int64 in place (a file stores int32 below 2^31 weights).
    """
    for name, t in delta.tensors.items():
        if any(x.dim() != 1 for x in (t.indices, t.diff, t.exact_at, t.exact_base, t.exact_tuned)):
            raise DeltaError(f"{name!r}: indices, differences and exact values must be 1-D")
        if t.indices.dtype not in (torch.int32, torch.int64) or t.exact_at.dtype != torch.int64:
            raise DeltaError(f"{name!r}: indices must be int32 or int64 and exact_at int64, got "
                             f"{t.indices.dtype} and {t.exact_at.dtype}")
        exact_floats = t.exact_base.is_floating_point() and t.exact_tuned.is_floating_point()
        if t.diff.dtype != torch.float32 or not exact_floats:
            raise DeltaError(f"{name!r}: differences must be float32 and exact values floating point, got "
                             f"{t.diff.dtype}, {t.exact_base.dtype} and {t.exact_tuned.dtype}")
        if t.indices.numel() != t.diff.numel():
            raise DeltaError(f"{name!r}: {t.indices.numel()} indices but {t.diff.numel()} differences")
        if not t.exact_at.numel() == t.exact_base.numel() == t.exact_tuned.numel():
            raise DeltaError(f"{name!r}: its exact_at, exact_base and exact_tuned differ in length")
        t.indices = t.indices.long()
        if t.indices.numel() > 1 and not bool((t.indices[1:] > t.indices[:-1]).all()):
            raise DeltaError(f"{name!r}: indices are not strictly increasing")
        n = torch.Size(t.shape).numel()
        if t.indices.numel() and (int(t.indices[0]) < 0 or int(t.indices[-1]) >= n):  # sorted: the ends suffice
            raise DeltaError(f"{name!r}: index out of range for {n} weights")
        bad = int((~torch.isfinite(t.diff)).sum())
        if bad:
            raise DeltaError(f"{name!r}: {bad} of its differences are NaN or Inf")
        if t.exact_at.numel() and (int(t.exact_at.min()) < 0 or int(t.exact_at.max()) >= t.indices.numel()):
            raise DeltaError(f"{name!r}: exact_at points outside its {t.indices.numel()} indices")


def _checked_params(model: torch.nn.Module, delta: Delta) -> dict[str, torch.Tensor]:
    """The model's parameters the delta names, after checking the delta's structure and its names and shapes."""
    _check_structure(delta)
    params = dict(model.named_parameters())
    for name, t in delta.tensors.items():
        if name not in params:
            raise DeltaError(f"delta parameter {name!r} is not in the model")
        p = params[name]
        if tuple(p.shape) != tuple(t.shape):
            raise DeltaError(f"delta parameter {name!r} has shape {tuple(t.shape)}, the model's {tuple(p.shape)}")
    return params


def _values_at(params: dict[str, torch.Tensor], delta: Delta) -> dict[str, torch.Tensor]:
    """Copies of the model's values at each parameter's delta indices."""
    return {n: gather(params[n].detach(), t.indices.to(params[n].device)) for n, t in delta.tensors.items()}


def _fingerprint_of(values: dict[str, torch.Tensor], delta: Delta) -> str:
    """The fingerprint of ``values`` at the delta's indices (what make_delta stores for base and tuned values)."""
    return _fingerprint(values, {n: t.indices for n, t in delta.tensors.items()},
                        {n: t.shape for n, t in delta.tensors.items()})


def _not_the_start(delta: Delta, subtract: bool) -> DeltaError:
    which = "the tuned model this delta was made from" if subtract else "the base model this delta was made from"
    return DeltaError(f"the model is not {which}: its values at the delta's {delta.num_weights:,} weights differ "
                      f"(another checkpoint or dtype, or a delta that shares weights applied before); "
                      f"--force (force=True) applies it anyway")


def check_delta(model: torch.nn.Module, delta: Delta, *, subtract: bool = False) -> None:
    """Raise DeltaError unless ``model`` is the delta's base (its tuned model with ``subtract``) at the delta's weights."""
    values = _values_at(_checked_params(model, delta), delta)
    if _fingerprint_of(values, delta) != (delta.tuned_fingerprint if subtract else delta.base_fingerprint):
        raise _not_the_start(delta, subtract)


def _moved(current: torch.Tensor, t: TensorDelta, subtract: bool) -> torch.Tensor:
    """``current`` (a parameter's values at ``t.indices``) plus the differences (minus, with ``subtract``)."""
    work = _compute_dtype(current.dtype)
    diff = t.diff.to(device=current.device, dtype=work)
    new = (current.to(work) - diff if subtract else current.to(work) + diff).to(current.dtype)
    if t.exact_at.numel():
        at = t.exact_at.to(current.device)
        start, end = (t.exact_tuned, t.exact_base) if subtract else (t.exact_base, t.exact_tuned)
        start = start.to(device=current.device, dtype=current.dtype)
        end = end.to(device=current.device, dtype=current.dtype)
        hit = _bits(current[at]) == _bits(start)  # only where the model holds the value the pair starts from
        new[at[hit]] = end[hit]
    return new


@torch.no_grad()
def apply_delta(model: torch.nn.Module, delta: Delta, *, force: bool = False, subtract: bool = False) -> None:
    """Add the delta's differences to ``model`` in place (remove them with ``subtract``), on any ``nn.Module``.

    Checks the delta's structure, names, shapes and index ranges, and that the model holds the
    delta's base values (its tuned values with ``subtract``) at the delta's weights: DeltaError
    otherwise, unless ``force``. When the model holds them, the result is computed aside and
    must match the delta's tuned fingerprint (base with ``subtract``) before any weight is
    written: a damaged delta raises DeltaError and leaves the model as it was. Bit for bit when
    the check passes; see the module docstring for composition.
    """
    params = _checked_params(model, delta)
    current = _values_at(params, delta)
    start, end = ((delta.tuned_fingerprint, delta.base_fingerprint) if subtract
                  else (delta.base_fingerprint, delta.tuned_fingerprint))
    holds_start = _fingerprint_of(current, delta) == start
    if not holds_start and not force:
        raise _not_the_start(delta, subtract)
    new = {n: _moved(current[n], t, subtract) for n, t in delta.tensors.items()}
    if holds_start and _fingerprint_of(new, delta) != end:
        what = "removing its differences from its tuned" if subtract else "adding its differences to its base"
        raise DeltaError(f"damaged delta: {what} values does not give the values it was made from (their "
                         f"fingerprint differs); the model was left unchanged")
    for name, t in delta.tensors.items():
        scatter_(params[name], t.indices.to(params[name].device), new[name])
