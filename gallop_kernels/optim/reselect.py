"""Moving a SparseAdamW to a new Selection of the same parameters (:meth:`SparseAdamW.reselect`).

Per parameter, one ``searchsorted`` of the new sorted indices in the old ones
finds the entries that stay (O(k log k), no loop over weights); their state is
copied bit for bit with one ``index_copy_`` per state tensor, the joining
entries start at zero moments with a master copy of the current weight, and
the old tensors are dropped. Step counters go on: a parameter's count is copied
into the new device buffer, or kept aside while nothing of it is selected.
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


def carried(old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions in ``new``, positions in ``old``) of the indices both hold.

    old, new: sorted unique 1-D int64 indices on one device. O(len(new) log len(old)).
    """
    if not old.numel() or not new.numel():
        empty = torch.empty(0, dtype=torch.int64, device=new.device)
        return empty, empty
    pos = torch.searchsorted(old, new)
    hit = old[pos.clamp(max=old.numel() - 1)] == new
    at_new = hit.nonzero().squeeze(1)
    return at_new, pos[at_new]


def moved_state(state: dict, param: torch.Tensor, new: torch.Tensor, at_new: torch.Tensor, at_old: torch.Tensor) -> dict:
    """``state`` (exp_avg, exp_avg_sq, [max_exp_avg_sq], [master_param]) moved to indices ``new``:
    entries ``at_old`` are copied to ``at_new``; the others are zero, the master copy of a
    joining entry is the current weight. ``step`` and other keys are left to the caller."""
    out = {"indices": new}
    for key in _MOMENT_KEYS:
        if key in state:
            out[key] = torch.zeros(new.numel(), dtype=torch.float32, device=new.device).index_copy_(
                0, at_new, state[key].index_select(0, at_old))
    if "master_param" in state:
        master = gather(param.detach(), new).float()  # a fresh tensor: the joining entries' weights
        out["master_param"] = master.index_copy_(0, at_new, state["master_param"].index_select(0, at_old))
    return out


def check(opt, selection: Selection) -> None:
    """Raise, with one line naming the problem, unless ``opt`` can move to ``selection``."""
    if not isinstance(selection, Selection):
        raise TypeError(f"reselect: selection must be a gallop_kernels.Selection, got {type(selection).__name__}")
    for p, name in opt._names.items():
        try:
            selection.check_matches(name, p)
            _check_indices(name, selection[name], local(p).numel())
        except ValueError as err:
            raise ValueError(f"reselect: {err}; a new selection must be of this optimizer's parameters") from None
    if opt._compact is not None and opt._compact.filled:
        raise RuntimeError("reselect: compact gradients of the current selection are pending; call reselect "
                           "after step() and zero_grad(), not between backward and step")


@torch.no_grad()
def reselect(opt, selection: Selection) -> Moved:
    """Move ``opt`` (a SparseAdamW) to ``selection``; see :meth:`SparseAdamW.reselect`."""
    check(opt, selection)
    old_indices = dict(opt._indices)
    moves = {p: carried(old_indices[p], selection[name].to(p.device)) for p, name in opt._names.items()}
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
    for p, step in old_steps.items():
        state = opt.state[p]
        state.update(moved_state(state, p, opt._indices[p], *moves[p]))
        state["step"] = opt._step_views[p] if p in opt._step_views else step.clone()
    opt._plan = None
    opt._version += 1
    kept = sum(at_new.numel() for at_new, _ in moves.values())
    new_total = sum(i.numel() for i in opt._indices.values())
    old_total = sum(i.numel() for i in old_indices.values())
    return Moved(kept, new_total - kept, old_total - kept)
