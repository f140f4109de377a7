"""Reselector: re-select a SparseAdamW's weights during training (GaLLoP re-selection, SpIEL).

In the style of SpIEL's ``SftSelector``: build it next to the optimizer and call
:meth:`Reselector.step` after every ``opt.step()`` (before ``zero_grad``, since it
reads ``.grad``)::

    opt = gk.SparseAdamW(model.named_parameters(), selection=sel, lr=1e-4)
    resel = gk.Reselector(opt, model, every=100, accumulate=4)                 # GaLLoP
    # resel = gk.Reselector(opt, model, every=20, accumulate=5, method="spiel", total_steps=1000)
    for batch in loader:
        opt.zero_grad(); model(**batch).loss.backward()
        opt.step(); resel.step()
    delta = make_delta(model, resel.trained, resel.base_values)

Every ``every`` steps, with ``g`` the gradient summed over the last ``accumulate`` steps:

- ``method="gallop"``: the exact global top-k of the GaLLoP score of ``g`` and the current
  weights at the selection's own rho (:func:`gallop_kernels.select_mask`). Weights that leave
  keep their trained values, so :attr:`Reselector.trained` is every weight trained so far.
- ``method="spiel"`` (SpIEL, Ansell et al. 2024): ``r = floor(rate * k)`` weights change, the
  rate falling linearly from ``initial_rate`` at step 0 to 0 at ``total_steps``: the ``r``
  trained weights that moved least (smallest ``|theta - theta0|``; the set keeps the ``k - r``
  that moved most, ties to the earlier weight) go back to ``theta0`` bit for bit and leave, and
  the ``r`` untrained weights with the largest ``|g|`` join, both one exact global selection
  (``select_mask(..., among=)`` / ``exclude=``). :attr:`Reselector.trained` is the current set.

The optimizer then moves to the new set (:meth:`SparseAdamW.reselect`); :attr:`Reselector.trained`
and :attr:`Reselector.base_values` (their values before training) make the run's delta.
"""

from __future__ import annotations

import time

import torch

from .distributed import GroupComm, dtensor_group, gather, local, scatter_
from .optim import SparseAdamW
from .optim.reselect import matches
from .select import Selection, select_mask

METHODS = ("gallop", "spiel")


class Reselector:
    """Re-select ``opt``'s weights every ``every`` steps; see the module docstring.

    opt: a SparseAdamW over ``model``'s trainable parameters (all of them, as
    select_mask scores them), without ``compact_grads`` (it frees the dense
    gradients the score needs). every (int >= 1): steps between re-selections.
    accumulate (int in [1, every], default 1): the gradients of the last
    ``accumulate`` steps up to a re-selection are summed (float32, one copy of
    the trainable weights, held only during those steps). method: "gallop" or
    "spiel"; total_steps (spiel: the run's length, where the rate reaches 0) and
    initial_rate (spiel, in [0, 1], default 0.2). eps, backend, process_group:
    as in select_mask (under DDP, where every rank holds the same averaged
    gradients, pass the group: each re-selection checks that the ranks agree).
    ``history`` lists per re-selection its step, the entries kept, added and
    dropped, the share of the set that changed and the seconds it took.
    :meth:`state_dict` and :meth:`load_state_dict` resume a run.
    """

    def __init__(self, opt: SparseAdamW, model: torch.nn.Module, *, every: int, accumulate: int = 1,
                 method: str = "gallop", total_steps: int | None = None, initial_rate: float = 0.2,
                 eps: float = 1e-8, backend: str = "auto", process_group=None):
        if not isinstance(opt, SparseAdamW):
            raise TypeError(f"Reselector: opt must be a gallop_kernels.SparseAdamW, got {type(opt).__name__}")
        if method not in METHODS:
            raise ValueError(f"Reselector: unknown method {method!r}; expected one of {METHODS}")
        _check_int("every", every, 1)
        _check_int("accumulate", accumulate, 1, every)
        if method == "spiel":
            _check_int("total_steps", total_steps, 1)
            rate = initial_rate
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
                raise ValueError(f"Reselector: initial_rate must be a number in [0, 1], got {initial_rate!r}")
        if opt.compact_grads:
            raise ValueError("Reselector: the optimizer has compact_grads=True, which frees the dense gradients "
                             "re-selection scores; build it with compact_grads=False")
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        missing = sorted(set(params) - set(opt.selection))
        if missing:
            raise ValueError(f"Reselector: trainable parameters {missing[:3]} of the model are not in the optimizer's "
                             f"selection: select_mask scores every trainable parameter")
        self.opt, self.model, self.every, self.accumulate = opt, model, every, accumulate
        self.method, self.total_steps, self.initial_rate = method, total_steps, initial_rate
        self.eps, self.backend, self.process_group = eps, backend, process_group
        self.steps = 0
        self.history: list[dict] = []
        self._params = params
        self._sum: dict[str, torch.Tensor] | None = None
        sel = opt.selection
        self.trained = Selection({n: sel[n] for n in params}, {n: sel.shapes[n] for n in params}, rho=sel.rho,
                                 criterion=sel.criterion, scope=sel.scope, threshold=sel.threshold)
        """The weights the run's delta covers (a Selection): every weight trained so far (gallop),
        the current set (spiel)."""
        self._base = {n: gather(p.detach(), self.trained[n].to(p.device)).clone() for n, p in params.items()}

    @property
    def base_values(self) -> dict[str, torch.Tensor]:
        """Values of :attr:`trained` before training (name -> tensor in the weight dtype; parameters
        with nothing trained left out, as :func:`gallop_kernels.delta.selected_values` does)."""
        return {n: v for n, v in self._base.items() if v.numel()}

    def step(self):
        """Count one optimizer step; sum its gradients when a re-selection is near, re-select when due.

        Returns the :class:`~gallop_kernels.optim.reselect.Moved` of a re-selection, else None.
        """
        self.steps += 1
        phase = self.steps % self.every
        if phase == 0 or phase > self.every - self.accumulate:
            self._add_grads()
        return self._reselect() if phase == 0 else None

    def state_dict(self) -> dict:
        """What a resumed run needs besides the optimizer (``opt.state_dict()`` and ``opt.selection``): the step
        count, :attr:`history`, :attr:`trained`, its base values and the gradient sum in progress (a dense
        float32 copy of the trainable weights, only within ``accumulate`` steps of a re-selection); on the CPU."""
        cpu = lambda d: None if d is None else {n: t.cpu() for n, t in d.items()}  # noqa: E731
        return {"steps": self.steps, "history": [dict(h) for h in self.history], "trained": self.trained.state_dict(),
                "base": cpu(self._base), "sum": cpu(self._sum)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` output; build this Reselector on the resumed optimizer (its
        selection and state loaded) and the same model."""
        on = lambda d: None if d is None else {n: t.to(self._params[n].device) for n, t in d.items()}  # noqa: E731
        self.steps, self.history = state["steps"], [dict(h) for h in state["history"]]
        self.trained = Selection.from_state_dict(state["trained"])
        self._base, self._sum = on(state["base"]), on(state["sum"])

    def rate(self, step: int) -> float:
        """SpIEL's share of the set replaced at ``step``: initial_rate falling linearly to 0 at total_steps."""
        return self.initial_rate * max(0.0, 1.0 - step / self.total_steps)

    @torch.no_grad()
    def _add_grads(self) -> None:
        """Add this step's ``.grad`` to the float32 sums (a parameter without one adds nothing)."""
        if self._sum is None:
            self._sum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self._params.items()}
        for n, p in self._params.items():
            if p.grad is not None:
                self._sum[n].add_(p.grad)

    def _reselect(self):
        """Pick the new set, move the optimizer and the trained set there, record it."""
        t0 = time.perf_counter()
        old = self.opt.selection
        if self.method == "gallop":
            sel = select_mask(self.model, self._sum, rho=old.rho, criterion="gallop", eps=self.eps, scope=old.scope,
                              backend=self.backend, process_group=self.process_group)
            extra = {}
        else:
            sel, extra = self._spiel(old)
        self._sum = None
        moved = self.opt.reselect(sel)
        self._track(sel, keep_old=self.method == "gallop")
        self.history.append(dict(step=self.steps, kept=moved.kept, added=moved.added, dropped=moved.dropped,
                                 changed=moved.changed, seconds=time.perf_counter() - t0, **extra))
        return moved

    @torch.no_grad()
    def _spiel(self, old: Selection) -> tuple[Selection, dict]:
        """SpIEL's drop and regrow (see the module docstring); dropped weights are reset to theta0."""
        rate = self.rate(self.steps)
        k = self._over_ranks(old.num_selected)  # r and k - r count the whole set, on every rank
        r = int(rate * k)
        if r == 0:
            return old, {"rate": rate}
        moved = {n: gather(p.detach(), old[n]).float() - self._base[n].float() for n, p in self._params.items()}
        keep = select_mask(self.model, moved, k=k - r, criterion="saft", among=old, backend=self.backend,
                           process_group=self.process_group)
        grow = select_mask(self.model, self._sum, k=r, criterion="saft", exclude=old, backend=self.backend,
                           process_group=self.process_group)
        dropped = old - keep
        for n, p in self._params.items():  # back to theta0, bit for bit
            _, at = matches(old[n], dropped[n])  # every dropped weight is in old
            scatter_(p.detach(), dropped[n], self._base[n][at])
        return keep | grow, {"rate": rate}

    def _over_ranks(self, n: int) -> int:
        """``n`` summed over the FSDP2 ranks (``n`` itself in one process)."""
        params = list(self._params.values())
        group = dtensor_group(params)
        if group is None:
            return n
        return int(GroupComm(group).all_sum(torch.tensor([n], device=local(params[0]).device))[0])

    @torch.no_grad()
    def _track(self, sel: Selection, keep_old: bool) -> None:
        """:attr:`trained` becomes ``sel`` (with the old set too when ``keep_old``); new weights'
        current values (never trained, so the base's) join :attr:`base_values`."""
        indices = {}
        for n, p in self._params.items():
            old = self.trained[n].to(p.device)
            now = torch.cat([old, sel[n].to(p.device)]).unique() if keep_old else sel[n].to(p.device)  # sorted
            fresh = gather(p.detach(), now)
            if old.numel():
                stays, at = matches(old, now)
                fresh = torch.where(stays, self._base[n][at], fresh)
            self._base[n] = fresh
            indices[n] = now
        t = self.trained
        self.trained = Selection(indices, t.shapes, rho=t.rho, criterion=t.criterion, scope=t.scope, threshold=None)


def _check_int(what: str, value, low: int, high: int | None = None) -> None:
    """ValueError naming ``what`` unless ``value`` is an int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"Reselector: {what} must be an integer {bound}, got {value!r}")
