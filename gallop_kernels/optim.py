"""SparseAdamW: AdamW on the selected weights only, with O(k) optimizer state."""

from __future__ import annotations

import copy
import math

import torch

from . import reference
from .reference import SUPPORTED_DTYPES
from .select import Selection

_STATE_FLOAT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class SparseAdamW(torch.optim.Optimizer):
    """AdamW that updates only the weights in ``selection``.

    Behaves as ``torch.optim.AdamW`` run on the selected weights alone: the other
    weights of each parameter never change (weight decay included), and the state
    (``exp_avg``, ``exp_avg_sq``, ``step``) holds one float32 entry per selected
    weight. ``params`` must be named: ``model.named_parameters()`` or param groups
    whose ``"params"`` are ``(name, tensor)`` pairs.
    """

    def __init__(
        self,
        params,
        selection: Selection,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
    ):
        _check_hyper(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if not isinstance(selection, Selection):
            raise TypeError(f"selection must be a gallop_kernels.Selection, got {type(selection).__name__}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults)
        self.selection = selection
        self._names: dict[torch.Tensor, str] = {}
        for group in self.param_groups:
            _check_hyper(lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"])
            names = group.get("param_names")
            if names is None:
                raise TypeError(
                    "SparseAdamW needs parameter names to find each parameter's selection: "
                    "pass model.named_parameters() or groups of (name, param) pairs"
                )
            for name, p in zip(names, group["params"]):
                if p.dtype not in SUPPORTED_DTYPES:
                    raise TypeError(f"parameter {name!r}: dtype {p.dtype} is not supported; expected one of {SUPPORTED_DTYPES}")
                selection.check_matches(name, p)
                self._names[p] = name
        self._indices = {p: selection[n].to(p.device) for p, n in self._names.items()}

    def _state_for(self, p: torch.Tensor, amsgrad: bool) -> dict:
        state = self.state[p]
        if not state:
            k = self._indices[p].numel()
            zeros = lambda: torch.zeros(k, dtype=torch.float32, device=p.device)  # noqa: E731
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = zeros()
            state["exp_avg_sq"] = zeros()
            if amsgrad:
                state["max_exp_avg_sq"] = zeros()
            state["indices"] = self._indices[p]
        return state

    def _params_to_update(self):
        """(group, param, grad) for every param with a gradient and a selected weight.

        Checks them all before anything is changed, so an error never leaves a
        step half-applied.
        """
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                name = self._names[p]
                self.selection.check_matches(name, p)
                if p.grad is None or self._indices[p].numel() == 0:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise TypeError(f"parameter {name!r}: sparse gradients are not supported")
                if g.shape != p.shape or g.device != p.device:
                    raise ValueError(
                        f"parameter {name!r}: gradient {tuple(g.shape)} on {g.device} does not match "
                        f"parameter {tuple(p.shape)} on {p.device}"
                    )
                if g.dtype not in SUPPORTED_DTYPES:
                    raise TypeError(f"parameter {name!r}: gradient dtype {g.dtype} is not supported")
                work.append((group, p, g))
        return work

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, p, g in self._params_to_update():
            state = self._state_for(p, group["amsgrad"])
            beta1, beta2 = group["betas"]
            reference.sparse_adamw_step(
                p,
                g,
                state["indices"],
                state["exp_avg"],
                state["exp_avg_sq"],
                state.get("max_exp_avg_sq"),
                state["step"],
                lr=float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                amsgrad=group["amsgrad"],
                maximize=group["maximize"],
            )
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict`; it must belong to the same selection.

        Unlike torch.optim, the compact states stay float32 whatever the
        parameter's dtype.
        """
        saved = copy.deepcopy(state_dict["state"])
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, st in saved.items():
            if not isinstance(pid, int) or not 0 <= pid < len(params):
                raise ValueError(f"optimizer state has an entry for unknown parameter id {pid!r}")
            p = params[pid]
            name, idx = self._names[p], self._indices[p]
            got = st.get("indices")
            if got is None or got.shape != idx.shape or not torch.equal(got.to(idx.device), idx):
                raise ValueError(
                    f"parameter {name!r}: the saved optimizer state was made for a different selection "
                    f"({0 if got is None else got.numel()} saved indices, {idx.numel()} selected now)"
                )
            for key in _STATE_FLOAT_KEYS:
                if key in st and st[key].shape != idx.shape:
                    raise ValueError(f"parameter {name!r}: saved {key} has {st[key].numel()} entries, expected {idx.numel()}")
        super().load_state_dict(state_dict)
        for pid, st in saved.items():
            p = params[pid]
            state = self.state[p]
            for key in _STATE_FLOAT_KEYS:
                if key in st:
                    state[key] = st[key].to(device=p.device, dtype=torch.float32)
            state["indices"] = self._indices[p]


def _check_hyper(*, lr, betas, eps, weight_decay) -> None:
    if isinstance(lr, torch.Tensor):
        raise TypeError("lr must be a float; tensor lr is not supported")
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"Invalid learning rate: {lr!r} (must be a finite number >= 0)")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair)")
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b!r} (must be in [0, 1))")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"Invalid epsilon value: {eps!r} (must be a finite number >= 0)")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"Invalid weight_decay value: {weight_decay!r} (must be a finite number >= 0)")
