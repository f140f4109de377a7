"""Reselector: re-select a SparseAdamW's weights during training (GaLLoP re-selection).

In the style of SpIEL's ``SftSelector``: build it next to the optimizer and call
:meth:`Reselector.step` after every ``opt.step()`` (before ``zero_grad``, since it
reads ``.grad``)::

    opt = gk.SparseAdamW(model.named_parameters(), selection=sel, lr=1e-4)
    resel = gk.Reselector(opt, model, every=100, accumulate=4)
    for batch in loader:
        opt.zero_grad(); model(**batch).loss.backward()
        opt.step(); resel.step()
    delta = make_delta(model, resel.trained, resel.base_values)

Every ``every`` steps it scores every weight with the GaLLoP score of the gradient
summed over the last ``accumulate`` steps and the current weights, takes the exact
global top-k at the selection's own rho (:func:`gallop_kernels.select_mask`), and moves
the optimizer there (:meth:`SparseAdamW.reselect`). Weights that leave keep their
trained values, so :attr:`Reselector.trained` (every weight trained so far) and
:attr:`Reselector.base_values` (their values before training) make the run's delta.
"""

from __future__ import annotations

import time

import torch

from .distributed import gather
from .optim import SparseAdamW
from .optim.reselect import carried
from .select import Selection, select_mask


class Reselector:
    """Re-select ``opt``'s weights every ``every`` steps; see the module docstring.

    opt: a SparseAdamW over ``model``'s trainable parameters (all of them, as
    select_mask scores them), without ``compact_grads`` (it frees the dense
    gradients the score needs). every (int >= 1): steps between re-selections.
    accumulate (int in [1, every], default 1): the gradients of the last
    ``accumulate`` steps up to a re-selection are summed (float32, one copy of
    the trainable weights, held only during those steps). eps, backend: as in
    select_mask. ``history`` lists per re-selection its step, the entries kept,
    added and dropped, the share of the set that changed and the seconds it took.
    """

    def __init__(self, opt: SparseAdamW, model: torch.nn.Module, *, every: int, accumulate: int = 1,
                 eps: float = 1e-8, backend: str = "auto"):
        if not isinstance(opt, SparseAdamW):
            raise TypeError(f"Reselector: opt must be a gallop_kernels.SparseAdamW, got {type(opt).__name__}")
        for what, value, low, high in (("every", every, 1, None), ("accumulate", accumulate, 1, every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
                bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
                raise ValueError(f"Reselector: {what} must be an integer {bound}, got {value!r}")
        if opt.compact_grads:
            raise ValueError("Reselector: the optimizer has compact_grads=True, which frees the dense gradients "
                             "re-selection scores; build it with compact_grads=False")
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        missing = sorted(set(params) - set(opt.selection))
        if missing:
            raise ValueError(f"Reselector: trainable parameters {missing[:3]} of the model are not in the optimizer's "
                             f"selection: select_mask scores every trainable parameter")
        self.opt, self.model, self.every, self.accumulate = opt, model, every, accumulate
        self.eps, self.backend = eps, backend
        self.steps = 0
        self.history: list[dict] = []
        self._params = params
        self._sum: dict[str, torch.Tensor] | None = None
        sel = opt.selection
        self.trained = Selection({n: sel[n] for n in params}, {n: sel.shapes[n] for n in params}, rho=sel.rho,
                                 criterion=sel.criterion, scope=sel.scope, threshold=sel.threshold)
        """Every weight trained so far (a Selection): what the run's delta covers."""
        self.base_values = {n: gather(p.detach(), self.trained[n].to(p.device)).clone() for n, p in params.items()}
        """Values of :attr:`trained` before training (name -> tensor in the weight dtype)."""

    def step(self):
        """Count one optimizer step; sum its gradients when a re-selection is near, re-select when due.

        Returns the :class:`~gallop_kernels.optim.reselect.Moved` of a re-selection, else None.
        """
        self.steps += 1
        phase = self.steps % self.every
        if phase == 0 or phase > self.every - self.accumulate:
            self._add_grads()
        return self._reselect() if phase == 0 else None

    @torch.no_grad()
    def _add_grads(self) -> None:
        """Add this step's ``.grad`` to the float32 sums (a parameter without one adds nothing)."""
        if self._sum is None:
            self._sum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self._params.items()}
        for n, p in self._params.items():
            if p.grad is not None:
                self._sum[n].add_(p.grad)

    def _reselect(self):
        """select_mask on the summed gradients, then move the optimizer and the trained set there."""
        t0 = time.perf_counter()
        old = self.opt.selection
        sel = select_mask(self.model, self._sum, rho=old.rho, criterion="gallop", eps=self.eps, scope=old.scope,
                          backend=self.backend)
        self._sum = None
        moved = self.opt.reselect(sel)
        self._grow_trained(sel)
        self.history.append(dict(step=self.steps, kept=moved.kept, added=moved.added, dropped=moved.dropped,
                                 changed=moved.changed, seconds=time.perf_counter() - t0))
        return moved

    @torch.no_grad()
    def _grow_trained(self, sel: Selection) -> None:
        """Add ``sel``'s new weights to :attr:`trained`, their current values (never trained, so the base's) to
        :attr:`base_values`."""
        indices = {}
        for n, p in self._params.items():
            old = self.trained[n].to(p.device)
            union = torch.cat([old, sel[n].to(p.device)]).unique()  # sorted
            values = gather(p.detach(), union)
            at_new, at_old = carried(old, union)
            self.base_values[n] = values.index_copy_(0, at_new, self.base_values[n].index_select(0, at_old))
            indices[n] = union
        t = self.trained
        self.trained = Selection(indices, t.shapes, rho=t.rho, criterion=t.criterion, scope=t.scope, threshold=None)
