"""SparseAdamW: AdamW on the selected weights only, with O(k) optimizer state."""

from __future__ import annotations

import copy
import math
import weakref

import torch

from .. import reference
from .._ext import _C, require_ext
from ..distributed import gather, local
from ..ops import sparse_adamw as _kernel
from ..reference import SUPPORTED_DTYPES
from ..select import Selection

_STATE_FLOAT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")
BACKENDS = ("auto", "reference", "ext")


class SparseAdamW(torch.optim.Optimizer):
    """AdamW that updates only the weights in ``selection``.

    Behaves as ``torch.optim.AdamW`` run on the selected weights alone: the other
    weights of each parameter never change (weight decay included), and the state
    (``exp_avg``, ``exp_avg_sq``, ``step``) holds one float32 entry per selected
    weight. ``params`` must be named: ``model.named_parameters()`` or param groups
    whose ``"params"`` are ``(name, tensor)`` pairs.

    Options (keyword only):

    - ``master_weights`` (bool or None, default None): keep a float32 copy of
      the selected entries (state ``"master_param"``, 4 bytes per selected
      weight) and update it, so updates below bf16/fp16 resolution are not lost;
      the parameter gets its rounding. None: on for bf16/fp16 parameters, off for
      float32/float64.
    - ``compact_grads`` (bool, default False): post-accumulate-grad hooks gather
      each parameter's selected gradient entries into a float32 buffer as
      backward produces them and free the dense ``.grad`` at once, so backward
      holds one dense gradient at a time. Micro-batches accumulate into the
      buffers; :meth:`zero_grad` clears them. ``.grad`` stays None, so
      ``torch.nn.utils.clip_grad_norm_`` sees nothing: use
      :meth:`clip_grad_norm_`, which clips by the norm of the selected entries
      (in both modes). Gradients a caller assigns to ``.grad`` directly are
      still used. Single process only: DDP and FSDP hand gradients over in
      their own hooks, which this does not coordinate with.
    - ``backend`` ("auto", "reference" or "ext"): "ext" runs the compiled
      kernel (CUDA kernel for CUDA params, its host build for CPU params);
      "reference" the plain-torch path; "auto" the kernel where it applies
      (fp32/bf16/fp16, contiguous) and the reference path otherwise, but never
      the reference path for CUDA params when the extension is missing: that
      raises. All backends keep the same state and state_dict format, so a run
      can move between them.

    AMP: ``step(grad_scale=..., found_inf=...)`` (or the attributes of the same
    names that ``torch.amp.GradScaler`` sets on optimizers with
    ``_step_supports_amp_scaling``) multiplies gradients by ``1 / grad_scale``
    and skips the step when ``found_inf`` is nonzero; the kernel skips on the
    device, and the host step counter costs one read of ``found_inf``.
    """

    _step_supports_amp_scaling = True

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
        master_weights: bool | None = None,
        compact_grads: bool = False,
        backend: str = "auto",
    ):
        _check_hyper(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if backend == "ext":
            require_ext("SparseAdamW(backend='ext')")
        if master_weights not in (None, True, False):
            raise ValueError(f"master_weights must be None, True or False, got {master_weights!r}")
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
        self.master_weights = master_weights
        self.backend = backend
        self.compact_grads = bool(compact_grads)
        self._compact: dict[torch.Tensor, torch.Tensor] = {}
        self._hooks = []
        if self.compact_grads:
            # A weak reference: the parameters must not keep a dropped optimizer alive.
            me = weakref.ref(self)

            def hook(p: torch.Tensor) -> None:
                opt = me()
                if opt is not None:
                    opt._gather_grad(p)

            for p in self._names:
                self._hooks.append(p.register_post_accumulate_grad_hook(hook))

    def remove_hooks(self) -> None:
        """Unregister the ``compact_grads`` hooks (backward then leaves dense ``.grad`` again)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _uses_master(self, p: torch.Tensor) -> bool:
        if self.master_weights is None:
            return p.dtype in (torch.bfloat16, torch.float16)
        return self.master_weights

    @torch.no_grad()
    def _gather_grad(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: add the selected entries of p.grad to its
        compact float32 buffer, then free the dense gradient."""
        g = p.grad
        if g is None:
            return
        idx = self._indices[p]
        if idx.numel() and not g.is_sparse and g.shape == p.shape:
            c = gather(g, idx).float()
            buf = self._compact.get(p)
            if buf is None:
                self._compact[p] = c
            else:
                buf.add_(c)
            p.grad = None
        elif not idx.numel():
            p.grad = None  # nothing selected: the gradient is never used
        # a malformed gradient stays in .grad for step() to report

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset gradients, the compact buffers of ``compact_grads`` included."""
        super().zero_grad(set_to_none)
        if set_to_none:
            self._compact.clear()
        else:
            for buf in self._compact.values():
                buf.zero_()

    def amp_step(self, scaler, closure=None):
        """``scaler.step(self)`` that also works with ``compact_grads``.

        torch.amp.GradScaler finds overflows by reading ``.grad``, which
        ``compact_grads`` leaves empty (its ``update()`` would then fail with "No
        inf checks were recorded"). This steps with the scaler's scale, checks the
        compact gradients for Inf/NaN on the device, and records the result where
        ``scaler.update()`` reads it. Use it in place of ``scaler.step(opt)``, and
        do not call ``scaler.unscale_(opt)``: to clip, call
        ``opt.clip_grad_norm_(max_norm * scaler.get_scale())`` on the scaled
        gradients. Without ``compact_grads`` it is ``scaler.step(self)``.
        """
        if not self.compact_grads:
            return scaler.step(self, closure) if closure is not None else scaler.step(self)
        from torch.amp.grad_scaler import OptState  # GradScaler's bookkeeping (torch >= 2.3)

        if not scaler.is_enabled():
            return self.step(closure)
        opt_state = scaler._per_optimizer_states[id(self)]
        if opt_state["stage"] is not OptState.READY:
            raise RuntimeError(
                "amp_step: scaler.unscale_(opt) or scaler.step(opt) was already called since the last "
                "update(); with compact_grads the gradients stay scaled until the step"
            )
        if closure is not None:
            raise RuntimeError("amp_step: closures are not supported with a GradScaler (as in scaler.step)")
        scale = scaler._get_scale_async()
        found = torch.zeros(1, dtype=torch.float32, device=scale.device)
        with torch.no_grad():
            for t in list(self._compact.values()) + [p.grad for p in self._names if p.grad is not None]:
                found += (~torch.isfinite(t)).any().to(found.device)
        self.step(grad_scale=scale, found_inf=found)
        opt_state["found_inf_per_device"] = {found.device: found}
        opt_state["stage"] = OptState.STEPPED

    def grad_bytes(self) -> int:
        """Bytes held right now by this optimizer's gradients: dense ``.grad`` tensors
        plus the compact buffers of ``compact_grads``."""
        dense = sum(local(p.grad).numel() * p.grad.element_size() for p in self._names if p.grad is not None)
        return dense + sum(b.numel() * b.element_size() for b in self._compact.values())

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
        """Clip the selected gradient entries by their total norm; returns that norm.

        The same formula as ``torch.nn.utils.clip_grad_norm_`` (per-tensor norms in
        float32, then their norm; coefficient ``max_norm / (norm + 1e-6)`` clamped
        to 1), over the entries this optimizer trains: the compact buffers with
        ``compact_grads``, the selected entries of ``.grad`` otherwise (the whole
        ``.grad`` is then scaled). Unselected entries never reach the weights, so
        they do not count.
        """
        max_norm, norm_type = float(max_norm), float(norm_type)
        grads = []  # (selected entries in float32, tensors to scale)
        for p, name in self._names.items():
            idx = self._indices[p]
            to_scale = [t for t in (self._compact.get(p), p.grad) if t is not None]
            if not to_scale or not idx.numel():
                continue
            sel = [t for t in to_scale if t is not p.grad]
            if p.grad is not None:
                sel.append(gather(p.grad, idx).float())
            entries = sel[0] if len(sel) == 1 else sum(sel)
            grads.append((entries, to_scale))
        if not grads:
            return torch.tensor(0.0)
        devices = {e.device for e, _ in grads}
        dev = next(iter(devices))
        norms = [torch.linalg.vector_norm(e, norm_type).to(dev) for e, _ in grads]
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
        if error_if_nonfinite and not bool(torch.isfinite(total)):
            raise RuntimeError(f"the total norm of order {norm_type} of the selected gradients is non-finite")
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for _, ts in grads:
            for t in ts:
                t.mul_(coef.to(device=t.device))
        return total

    def init_state(self) -> None:
        """Create every parameter's state now (zeros, step 0) instead of at its first step.

        A fresh optimizer's ``state_dict()`` then has every tensor in place, as
        torch.distributed.checkpoint needs a template to load into.
        """
        for group in self.param_groups:
            for p in group["params"]:
                if self._indices[p].numel():
                    self._state_for(p, group["amsgrad"])

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
        if self._uses_master(p):
            if "master_param" not in state:
                state["master_param"] = gather(p.detach(), self._indices[p]).float().clone()
        else:
            state.pop("master_param", None)
        return state

    def _use_kernel(self, name: str, p: torch.Tensor, g: torch.Tensor, compact: bool) -> bool:
        """Whether the compiled kernel updates ``p`` (else the reference path); raises
        where the chosen backend cannot run it."""
        if self.backend == "reference":
            return False
        lp, lg = local(p), local(g)
        if self.backend == "ext":
            if not _kernel.supports(lp, lg, compact):
                raise ValueError(
                    f"parameter {name!r}: sparse AdamW kernel not supported: grad {lg.dtype}, param {lp.dtype}, "
                    f"contiguous {lp.is_contiguous()}/{lg.is_contiguous()} (backend='ext' needs float32, bfloat16 "
                    f"or float16, contiguous); use backend='auto' or 'reference'"
                )
            return True
        if lp.device.type == "cuda":
            C = require_ext(f"SparseAdamW on CUDA parameter {name!r}")
            if not C.built_with_cuda:
                raise RuntimeError(
                    f"SparseAdamW on CUDA parameter {name!r}: gallop_kernels._C was built without CUDA. "
                    f"Rebuild with nvcc on PATH (pip install --no-build-isolation -e .) or pass backend='reference'"
                )
            return _kernel.supports(lp, lg, compact)
        return lp.device.type == "cpu" and _C is not None and _kernel.supports(lp, lg, compact)

    def _params_to_update(self):
        """(group, param, dense grad or None, compact grad or None, use kernel) for every
        param with a gradient and a selected weight.

        Checks them all before anything is changed, so an error never leaves a
        step half-applied.
        """
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                name = self._names[p]
                self.selection.check_matches(name, p)
                buf = self._compact.get(p)
                if (p.grad is None and buf is None) or self._indices[p].numel() == 0:
                    continue
                g = p.grad
                if g is not None:
                    if g.is_sparse:
                        raise TypeError(f"parameter {name!r}: sparse gradients are not supported")
                    if g.shape != p.shape or g.device != p.device:
                        raise ValueError(
                            f"parameter {name!r}: gradient {tuple(g.shape)} on {g.device} does not match "
                            f"parameter {tuple(p.shape)} on {p.device}"
                        )
                    if g.dtype not in SUPPORTED_DTYPES:
                        raise TypeError(f"parameter {name!r}: gradient dtype {g.dtype} is not supported")
                compact = buf is not None
                kernel = self._use_kernel(name, p, buf if compact else g, compact)
                work.append((group, p, g, buf, kernel))
        return work

    def _amp_found_inf(self, work, grad_scale, found_inf):
        """found_inf as a float32 tensor or None; with AMP, compact gradients (which
        GradScaler cannot see) add their own non-finite check, on the device."""
        if found_inf is not None and not isinstance(found_inf, torch.Tensor):
            # GradScaler sums an empty dict to int 0 when no .grad exists (compact_grads)
            found_inf = torch.tensor(float(found_inf))
        bufs = [buf for _, _, _, buf, _ in work if buf is not None]
        if bufs and (grad_scale is not None or found_inf is not None):
            dev = found_inf.device if found_inf is not None else bufs[0].device
            bad = torch.stack([(~torch.isfinite(b)).any().to(dev) for b in bufs]).any().float()
            found_inf = bad if found_inf is None else found_inf.to(torch.float32) + bad
        return found_inf

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None):
        """Perform one optimization step; ``closure`` re-evaluates the loss.

        grad_scale, found_inf: AMP loss scale and overflow flag (tensors), as
        torch's fused optimizers take them; default to the attributes
        ``self.grad_scale`` / ``self.found_inf`` that torch.amp.GradScaler sets.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        work = self._params_to_update()
        if not work:
            return loss
        found_inf = self._amp_found_inf(work, grad_scale, found_inf)
        rows, states, ref_work = [], [], []
        for group, p, g, buf, kernel in work:
            state = self._state_for(p, group["amsgrad"])
            idx = state["indices"]
            if buf is not None and g is not None:  # a .grad assigned by hand on top of backward's
                grad, compact = buf + gather(g, idx).float(), True
            elif buf is not None:
                grad, compact = buf, True
            else:
                grad, compact = g, False
            if not kernel:
                ref_work.append((group, p, grad, compact, state))
                continue
            rows.append(
                _kernel.Row(
                    name=self._names[p],
                    param=local(p.detach()),
                    grad=grad if compact else local(grad),
                    indices=idx,
                    exp_avg=state["exp_avg"],
                    exp_avg_sq=state["exp_avg_sq"],
                    max_exp_avg_sq=state.get("max_exp_avg_sq"),
                    master=state.get("master_param"),
                    grad_compact=compact,
                    step=float(state["step"]) + 1,
                    **_hyper(group),
                )
            )
            states.append(state)
        if rows:
            _kernel.sparse_adamw_step(rows, grad_scale=grad_scale, found_inf=found_inf)
            # The kernel skipped on the device; the host counter needs the flag once.
            if found_inf is None or float(found_inf) == 0:
                for state in states:
                    state["step"] += 1
        for group, p, grad, compact, state in ref_work:
            reference.sparse_adamw_step(
                p,
                grad,
                state["indices"],
                state["exp_avg"],
                state["exp_avg_sq"],
                state.get("max_exp_avg_sq"),
                state["step"],
                **_hyper(group),
                master=state.get("master_param"),
                grad_is_compact=compact,
                grad_scale=grad_scale,
                found_inf=found_inf,
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


def _hyper(group: dict) -> dict:
    """A param group's AdamW hyper-parameters as the update functions take them."""
    beta1, beta2 = group["betas"]
    return dict(
        lr=float(group["lr"]),
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        amsgrad=group["amsgrad"],
        maximize=group["maximize"],
    )


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
