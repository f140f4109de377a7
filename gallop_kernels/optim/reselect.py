"""Moving a SparseAdamW to a new Selection of the same parameters (:meth:`SparseAdamW.reselect`).

All parameters of a device at once: their sorted indices, offset by each
parameter's place in a concatenation, are one sorted list, so one ``searchsorted``
of the new list in the old finds the entries that stay (O(k log k), no loop over
weights, no host sync but one for the counts), and one ``torch.where`` per state key
copies their state bit for bit, starts the joining entries at zero moments (master
copy: the current weight) and drops the rest; each parameter's new state is a slice
of that key's buffer. Step counters go on: a parameter's count is copied into the
new device buffer, or kept aside while nothing of it is selected.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..distributed import gather, local
from ..select import Selection, _check_indices

_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class Moved(NamedTuple):
    """What :meth:`SparseAdamW.reselect` did, in entries over all parameters:
    ``kept`` in both selections, ``added`` new, ``dropped`` left."""

    kept: int
    added: int
    dropped: int

    @property
    def changed(self) -> float:
        """Share of the new set that was not in the old one (0 when the set is empty)."""
        total = self.kept + self.added
        return self.added / total if total else 0.0


def matches(old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each index of ``new``: whether ``old`` holds it (bool), and its position in ``old``
    (int64; meaningful only where it does). old, new: sorted unique 1-D int64 indices on one
    device. O(len(new) log len(old)), no host sync."""
    if not old.numel():
        return torch.zeros_like(new, dtype=torch.bool), torch.zeros_like(new, dtype=torch.int64)
    new = new.to(old.dtype)  # searchsorted wants one dtype (index lists may be int32 or int64)
    at = torch.searchsorted(old, new).clamp_(max=old.numel() - 1)
    return old[at] == new, at


def _positions(indices: list[torch.Tensor], numels: list[int], device: torch.device) -> torch.Tensor:
    """Each parameter's flat indices offset by the weights of the parameters before it: one list,
    sorted when each parameter's indices are (and in range)."""
    counts = torch.tensor([i.numel() for i in indices], device=device)
    sizes = torch.tensor(numels, device=device)
    offsets = torch.repeat_interleave(sizes.cumsum(0) - sizes, counts, output_size=sum(i.numel() for i in indices))
    return torch.cat(indices) + offsets


def check(opt, selection: Selection) -> None:
    """Raise, with one line naming the problem, unless ``opt`` can move to ``selection``:
    host checks per parameter, then one device check of all indices (order and range), and
    the named per-parameter check only when that one fails."""
    if not isinstance(selection, Selection):
        raise TypeError(f"reselect: selection must be a gallop_kernels.Selection, got {type(selection).__name__}")
    try:
        for p, name in opt._names.items():
            selection.check_matches(name, p)
            idx = selection[name]
            if not isinstance(idx, torch.Tensor):
                raise ValueError(f"parameter {name!r}: selection indices must be a tensor, got {type(idx).__name__}")
            _check_indices(name, idx[:0], local(p).numel())  # dtype and shape only: no entries, no host sync
        for dev, params in _by_device(opt).items():
            idx = [selection[opt._names[p]].to(dev) for p in params]
            numels = [local(p).numel() for p in params]
            flat = torch.cat(idx)
            counts = torch.tensor([i.numel() for i in idx], device=dev)
            limit = torch.repeat_interleave(torch.tensor(numels, device=dev), counts, output_size=flat.numel())
            pos = _positions(idx, numels, dev)
            if bool(((flat < 0) | (flat >= limit)).any() | (pos[1:] <= pos[:-1]).any()):
                for p, i, n in zip(params, idx, numels):
                    _check_indices(opt._names[p], i, n)
    except ValueError as err:
        raise ValueError(f"reselect: {err}; a new selection must be of this optimizer's parameters") from None
    if opt._compact is not None and any(opt._compact.holds(p) for p in opt._compact.buffers):
        raise RuntimeError("reselect: compact gradients of the current selection are pending (a .grad is its "
                           "CompactGrad); call reselect after step() and zero_grad(), not between backward and step")


def _by_device(opt) -> dict[torch.device, list[torch.Tensor]]:
    """The optimizer's parameters grouped by the device of their (local) data, in order."""
    out: dict[torch.device, list[torch.Tensor]] = {}
    for p in opt._names:
        out.setdefault(local(p).device, []).append(p)
    return out


def _move_states(opt, params: list[torch.Tensor], old: list[torch.Tensor], new: list[torch.Tensor]) -> torch.Tensor:
    """Move the state of ``params`` (one device) from indices ``old`` to ``new``; returns how many
    entries stay (a 0-dim device tensor)."""
    dev = new[0].device
    numels = [local(p).numel() for p in params]
    old_pos, new_pos = _positions(old, numels, dev), _positions(new, numels, dev)
    if not old_pos.numel():  # nothing to carry (before the first step the state is empty too)
        return torch.zeros((), dtype=torch.int64, device=dev)
    stays, at = matches(old_pos, new_pos)
    states = [opt.state.get(p) or {} for p in params]  # .get: opt.state is a defaultdict
    sizes = [i.numel() for i in new]
    for key in _MOMENT_KEYS + ("master_param",):
        if not any(key in st for st in states):
            continue
        before = torch.cat([st[key] if key in st else torch.zeros(i.numel(), device=dev) for st, i in zip(states, old)])
        if key == "master_param":  # a joining entry's master copy: its current weight
            fresh = torch.cat([gather(p.detach(), i).float() for p, i in zip(params, new)])
        else:
            fresh = torch.zeros(new_pos.numel(), dtype=torch.float32, device=dev)
        moved = torch.where(stays, before[at], fresh)
        for st, t in zip(states, moved.split(sizes)):
            if key in st:
                st[key] = t
    return stays.sum()


@torch.no_grad()
def reselect(opt, selection: Selection) -> Moved:
    """Move ``opt`` (a SparseAdamW) to ``selection``; see :meth:`SparseAdamW.reselect`."""
    check(opt, selection)
    old_indices = dict(opt._indices)
    old_steps = {p: st["step"] for p, st in opt.state.items() if "step" in st}
    if opt._plan is not None:
        for launch in opt._plan.launches:
            launch.plan.retire()
    opt._lay_out(selection)
    for dev, buf in opt._steps.items():
        going_on = [p for p in opt._params if p in old_steps and local(p).device == dev]
        if going_on:
            slots = torch.tensor([opt._slot[p] for p in going_on], device=dev)
            buf.index_copy_(0, slots, torch.stack([old_steps[p].reshape(()) for p in going_on]))
    kept = []
    for params in _by_device(opt).values():
        kept.append(_move_states(opt, params, [old_indices[p] for p in params], [opt._indices[p] for p in params]))
    for p, step in old_steps.items():
        state = opt.state[p]
        state["indices"] = opt._indices[p]
        state["step"] = opt._step_views[p] if p in opt._step_views else step.clone()
    opt._plan = None
    kept = int(sum(k.cpu() for k in kept))  # the one host sync
    new_total = sum(i.numel() for i in opt._indices.values())
    old_total = sum(i.numel() for i in old_indices.values())
    return Moved(kept, new_total - kept, old_total - kept)
