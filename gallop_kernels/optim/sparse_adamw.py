"""SparseAdamW: AdamW on the selected weights only, with O(k) optimizer state.

The step is planned once (:class:`gallop_kernels.ops.sparse_adamw.StepPlan`:
the table of rows, checked) and re-planned only when the set of parameters with
a gradient, a gradient's dtype, a hyper-parameter other than lr, or the state
(load_state_dict) changes. Per step the host then reads each gradient's address,
writes changed learning rates into a small device buffer, and calls one op per
device; step counters and bias corrections live on the device.

Over 400 lines because it is one torch.optim.Optimizer subclass (construction and checks,
planning, the step, state_dict round trips); what splits off along a real seam already has:
compact gradients, clipping and GradScaler in ``compact_grads.py``, the table and the launch in
``ops/sparse_adamw.py``.
"""

from __future__ import annotations

import copy
import math

import torch

from .. import reference
from .._ext import _C, require_ext
from ..distributed import gather, is_dtensor, local
from ..ops import sparse_adamw as _kernel
from ..reference import SUPPORTED_DTYPES
from ..select import Selection, check_grad
from . import compact_grads as _compact
from . import reselect as _reselect

_STATE_FLOAT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")
BACKENDS = ("auto", "reference", "host", "cuda")


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
      backward produces them and free the dense gradient at once, so backward
      holds one dense gradient at a time. ``.grad`` then is a storage-less
      :class:`~gallop_kernels.optim.compact_grads.CompactGrad` of the
      parameter's shape that stands for the buffer, so the usual calls act on
      the selected entries:

      * micro-batches (backward N times) accumulate into the buffers;
      * ``model.zero_grad()``, ``opt.zero_grad()`` (``set_to_none`` True or
        False) and ``p.grad = None`` clear them: the first backward after a
        clear overwrites the buffer, so no gradient outlives a clear (Trainer's
        loop: backward N times, clip, step, ``model.zero_grad()``);
      * ``torch.nn.utils.clip_grad_norm_(model.parameters(), c)`` (and
        accelerate's, which transformers.Trainer calls) clips by the norm of
        the selected entries, the same as :meth:`clip_grad_norm_` and as dense
        clipping of the selected entries; ``clip_grad_value_`` clamps them;
      * ``torch.amp.GradScaler`` (``unscale_``, its overflow check) sees them;
        :meth:`amp_step` does ``scaler.step`` and ``scaler.update`` in one call;
      * a gradient assigned to ``.grad`` replaces the compact one, as it would
        a dense one, and is used by the next step.

      Any other op on such a ``.grad`` (reading its values, ``backward(
      create_graph=True)``) raises, naming the calls above, rather than see
      no gradient; :meth:`remove_hooks` drops the compact gradients and
      returns to dense ones. Single process only: DDP and FSDP hand gradients
      over in their own hooks, which this does not coordinate with.
    - ``backend`` ("auto", "reference", "host" or "cuda"; the names of
      :func:`gallop_kernels.backends`): "host" runs the compiled kernel's CPU
      build on CPU params, "cuda" the CUDA kernel on CUDA params (a parameter on
      the other device raises); "reference" the plain-torch path; "auto" the kernel where it applies
      (fp32/bf16/fp16, contiguous) and the reference path otherwise, but never
      the reference path for CUDA params when the extension is missing: that
      raises. All backends keep the same state and state_dict format, so a run
      can move between them.

    ``lr`` may be a float or a 0-dim tensor (then read on the device every step,
    as CUDA graphs need). ``state["step"]`` is a float32 tensor on the
    parameter's device (a view of the optimizer's step counters); the kernel
    advances it and computes the bias corrections on the device. On CUDA the
    kernel path is capturable: after one eager step (which creates the state), a
    step can be captured in a ``torch.cuda.CUDAGraph`` and replayed; inside
    ``torch.compile`` the launch is the custom op ``gallop::sparse_adamw_step``.

    AMP: ``step(grad_scale=..., found_inf=...)`` (or the attributes of the same
    names that ``torch.amp.GradScaler`` sets on optimizers with
    ``_step_supports_amp_scaling``) multiplies gradients by ``1 / grad_scale``
    and skips the step when ``found_inf`` is nonzero, on the device (no host
    read). With ``compact_grads`` use :meth:`amp_step`.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        selection: Selection,
        lr: float | torch.Tensor = 1e-4,
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
        if backend in ("host", "cuda"):
            C = require_ext(f"SparseAdamW(backend={backend!r})")
            if backend == "cuda" and not C.built_with_cuda:
                raise RuntimeError("SparseAdamW(backend='cuda'): gallop_kernels._C was built without CUDA; "
                                   "rebuild with nvcc on PATH (pip install --no-build-isolation -e .)")
        if master_weights not in (None, True, False):
            raise ValueError(f"master_weights must be None, True or False, got {master_weights!r}")
        if not isinstance(selection, Selection):
            raise TypeError(f"selection must be a gallop_kernels.Selection, got {type(selection).__name__}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        self.selection = selection
        self.master_weights = master_weights
        self.backend = backend
        self.compact_grads = bool(compact_grads)
        self._names: dict[torch.Tensor, str] = {}
        self._group_of: dict[torch.Tensor, int] = {}
        self._indices: dict[torch.Tensor, torch.Tensor] = {}
        self._params: list[torch.Tensor] = []  # the parameters the step can change, in group order
        self._dtensor = False
        # Device-resident step counters (one float32 per parameter: state["step"] is
        # a view) and learning rates (one float64 per group), per device.
        self._slot: dict[torch.Tensor, int] = {}
        self._steps: dict[torch.device, torch.Tensor] = {}
        self._step_views: dict[torch.Tensor, torch.Tensor] = {}
        self._lrs: dict[torch.device, torch.Tensor] = {}
        self._lr_seen: dict[torch.device, list] = {}
        self._plan: _Plan | None = None
        self._version = 0  # bumped when the state or the layout changes: the plan is then rebuilt
        self._growth_tracker: torch.Tensor | None = None
        self._compact = None
        super().__init__(params, defaults)  # add_param_group for each group
        self._lay_out_compact()

    def add_param_group(self, param_group: dict) -> None:
        """Add a group whose ``"params"`` are ``(name, param)`` pairs of parameters the
        selection covers (with its own ``lr``, ``weight_decay``, ...); they join the next
        step. Checked before anything changes. Not with ``compact_grads`` after
        construction: the hooks and gradient buffers are laid out then."""
        if self._compact is not None:
            raise NotImplementedError(
                "SparseAdamW(compact_grads=True).add_param_group: the compact gradient buffers are laid out when "
                "the optimizer is created; pass every param group to the constructor instead"
            )
        params = param_group["params"]
        param_group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)  # a generator, once
        if not all(isinstance(p, tuple) for p in param_group["params"]):
            raise TypeError(
                "SparseAdamW needs parameter names to find each parameter's selection: "
                "pass model.named_parameters() or groups of (name, param) pairs"
            )
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()  # nothing half-added
            raise
        self._register(len(self.param_groups) - 1)

    def _check_group(self, group: dict) -> None:
        """Raise, naming the problem, unless ``group`` has valid hyper-parameters and
        parameters of a supported dtype that the selection was made for."""
        _check_hyper(lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"])
        for name, p in zip(group["param_names"], group["params"]):
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"parameter {name!r}: dtype {p.dtype} is not supported; expected one of {SUPPORTED_DTYPES}")
            self.selection.check_matches(name, p)

    def _register(self, gi: int) -> None:
        """Take param group ``gi`` (checked) into the step: names, indices, counters."""
        group = self.param_groups[gi]
        for name, p in zip(group["param_names"], group["params"]):
            self._names[p] = name
            self._group_of[p] = gi
            self._indices[p] = self.selection[name].to(p.device)
            if self._indices[p].numel():
                self._params.append(p)
                self._dtensor = self._dtensor or is_dtensor(p)
        self._layout_counters()

    def _layout_counters(self) -> None:
        """Lay out each device's step counters (a slot per parameter of ``_params``) and
        learning rates (one per group). A new group's parameters come last, so the others
        keep their slots and counts; their ``state["step"]`` moves to the new buffer."""
        per_device: dict[torch.device, int] = {}
        for p in self._params:
            dev = local(p).device
            self._slot[p] = per_device.get(dev, 0)
            per_device[dev] = self._slot[p] + 1
        for dev, n in per_device.items():
            old = self._steps.get(dev, torch.zeros(0, dtype=torch.float32, device=dev))
            self._steps[dev] = torch.cat([old, old.new_zeros(n - old.numel())])
            self._lrs[dev] = torch.zeros(len(self.param_groups), dtype=torch.float64, device=dev)
            self._lr_seen[dev] = [None] * len(self.param_groups)
        views = {dev: buf.unbind(0) for dev, buf in self._steps.items()}
        for p in self._params:
            self._step_views[p] = views[local(p).device][self._slot[p]]
            if "step" in self.state.get(p, {}):
                self.state[p]["step"] = self._step_views[p]
        self._version += 1

    def _lay_out_compact(self) -> None:
        """(Re)build the ``compact_grads`` hooks and buffers for the current index lists: every
        trainable parameter, also those with nothing selected (their gradient is then empty),
        so torch's clip_grad_norm_ over the model sees the optimizer's norm."""
        if self._compact is not None:
            self._compact.remove_hooks()
        self._compact = (_compact.CompactGrads([(p, self._indices[p]) for p in self._names if p.requires_grad])
                         if self.compact_grads else None)

    def _lay_out(self, selection: Selection) -> None:
        """Index lists, step counters (zero) and compact-gradient buffers of every parameter,
        all groups, for ``selection`` (in :meth:`reselect`); the state is left alone."""
        self.selection = selection
        self._indices = {p: selection[n].to(p.device) for p, n in self._names.items()}
        self._params = [p for p in self._names if self._indices[p].numel()]
        self._dtensor = any(is_dtensor(p) for p in self._params)
        self._slot, self._steps, self._step_views = {}, {}, {}
        self._layout_counters()
        self._lay_out_compact()

    def reselect(self, selection: Selection) -> _reselect.Moved:
        """Move the optimizer in place to ``selection``, a new Selection of the same parameters.

        Entries in both selections keep their state bit for bit (``exp_avg``,
        ``exp_avg_sq``, ``max_exp_avg_sq``, ``master_param``); entries that join
        start as AdamW starts a weight (zero moments, master copy from the current
        weight) but with their parameter's ``step`` count, which goes on; dropped
        entries' state is freed. The weights are not touched: what a dropped weight
        becomes is the caller's choice. O(k log k) work (per device, all parameters at once), the step is
        re-planned once (at the next step), and compact-gradient buffers, step
        counters and ``state_dict`` follow the new selection (save
        ``opt.selection.state_dict()`` with it). Under FSDP2 each rank moves its own
        shards: call it on every rank with that rank's selection.

        A step captured in a CUDA graph or compiled before the reselect is invalid
        (its table points at the freed state): recapture it; running a stale plan
        through the op raises. Call it after ``step()``/``zero_grad()``, not between
        backward and step. Returns :class:`~gallop_kernels.optim.reselect.Moved`
        (entries kept, added, dropped). A selection of another model is refused
        before anything changes.
        """
        return _reselect.reselect(self, selection)

    def remove_hooks(self) -> None:
        """Unregister the ``compact_grads`` hooks and drop the compact gradients
        (backward then leaves dense ``.grad`` again)."""
        if self._compact is not None:
            self._compact.remove_hooks()

    def _uses_master(self, p: torch.Tensor) -> bool:
        if self.master_weights is None:
            return p.dtype in (torch.bfloat16, torch.float16)
        return self.master_weights

    def amp_step(self, scaler, closure=None):
        """``scaler.step(self)`` followed by ``scaler.update()``, also with ``compact_grads``.

        torch.amp.GradScaler finds overflows by reading ``.grad``, which
        ``compact_grads`` leaves empty. With ``compact_grads`` this steps with the
        scaler's scale, checks the gradients for Inf/NaN on the device, and gives
        the scaler its next scale through ``scaler.update(new_scale)`` (the
        scaler's public API; see :func:`gallop_kernels.optim.compact_grads.amp_step`).
        Do not call ``scaler.update()`` after it, nor ``scaler.unscale_(opt)``
        before: to clip, call ``opt.clip_grad_norm_(max_norm * scaler.get_scale())``
        on the scaled gradients. Without ``compact_grads`` it is
        ``scaler.step(self, closure); scaler.update()``.
        """
        if not self.compact_grads:
            out = scaler.step(self, closure) if closure is not None else scaler.step(self)
            scaler.update()
            return out
        if closure is not None:
            raise RuntimeError("amp_step: closures are not supported with a GradScaler (as in scaler.step)")
        if not scaler.is_enabled():
            return self.step()
        if self._growth_tracker is None:  # steps since the last backoff, on the gradients' device
            dev = next(iter(self._compact.flat), torch.device("cpu"))
            self._growth_tracker = torch.zeros(1, dtype=torch.int32, device=dev)
        _compact.amp_step(self, scaler, self._growth_tracker)
        return None

    def grad_bytes(self) -> int:
        """Bytes held right now by this optimizer's gradients: dense ``.grad`` tensors
        plus the compact buffers of ``compact_grads`` that hold a gradient."""
        dense = sum(local(p.grad).numel() * p.grad.element_size() for p in self._names
                    if p.grad is not None and not (self._compact is not None and self._compact.holds(p)))
        return dense + (self._compact.nbytes() if self._compact is not None else 0)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
        """Clip the selected gradient entries by their total norm; returns that norm.
        See :func:`gallop_kernels.optim.compact_grads.clip_grad_norm_`."""
        return _compact.clip_grad_norm_(self, max_norm, norm_type, error_if_nonfinite)

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
            state["step"] = self._step_views[p]
            state["step"].zero_()
            state["exp_avg"] = zeros()
            state["exp_avg_sq"] = zeros()
            if amsgrad:
                state["max_exp_avg_sq"] = zeros()
            state["indices"] = self._indices[p]
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
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
        if self.backend in ("host", "cuda"):
            runs_on = "cpu" if self.backend == "host" else "cuda"
            if lp.device.type != runs_on:
                raise ValueError(f"parameter {name!r} is on {lp.device}, but backend={self.backend!r} runs on "
                                 f"{runs_on} parameters only; use backend='auto'")
            if not _kernel.supports(lp, lg, compact):
                raise ValueError(
                    f"parameter {name!r}: sparse AdamW kernel not supported: grad {lg.dtype}, param {lp.dtype}, "
                    f"contiguous {lp.is_contiguous()}/{lg.is_contiguous()} (the kernel needs float32, bfloat16 "
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

    def _grads(self) -> tuple[list, list | None]:
        """Each of ``self._params``' gradient (tensor or None) and, with
        compact_grads, whether it is a compact one."""
        if self._compact is None:
            grads = [p.grad for p in self._params]
            return ([local(g) for g in grads] if self._dtensor else grads), None
        grads, compact = [], []
        for p in self._params:
            buf = self._compact.grad(p)
            grads.append(buf if buf is not None else local(p.grad))
            compact.append(buf is not None)
        return grads, compact

    def _signature(self, grads, compact) -> tuple:
        """What the plan depends on, but the tensors' addresses and lr. (The state
        tensors are the plan's own: replacing them by hand, rather than through
        load_state_dict, is not seen.)"""
        hyper = tuple((g["betas"], g["eps"], g["weight_decay"], g["amsgrad"], g["maximize"]) for g in self.param_groups)
        dtypes = tuple(None if g is None else g.dtype for g in grads)
        return (self._version, self.master_weights, len(self.param_groups), hyper, dtypes,
                None if compact is None else tuple(compact))

    @torch.compiler.disable  # host work done once; a compiled step traces only the launch
    def _build(self, grads, compact, signature) -> _Plan:
        """Check every parameter with a gradient and lay out the step; nothing is
        changed (but state created) before every check has passed."""
        for p, name in self._names.items():
            self.selection.check_matches(name, p)
        work = []
        for i, p in enumerate(self._params):
            g = grads[i]
            if g is None:
                continue
            name, is_compact = self._names[p], bool(compact and compact[i])
            if type(g) is _compact.CompactGrad:  # not ours: it has no storage for the kernel to read
                raise ValueError(f"parameter {name!r}: .grad is the compact gradient of another SparseAdamW; call "
                                 f"that optimizer's zero_grad() or remove_hooks() first")
            if not is_compact:
                check_grad(name, local(p), g)
            work.append((i, p, g, is_compact, self._use_kernel(name, p, g, is_compact)))
        rows: dict[torch.device, list] = {}
        positions: dict[torch.device, dict] = {}
        ref = []
        for i, p, g, is_compact, kernel in work:
            group = self.param_groups[self._group_of[p]]
            state = self._state_for(p, group["amsgrad"])
            if not kernel:
                ref.append((i, p, is_compact))
                continue
            row = _kernel.Row(
                name=self._names[p],
                param=local(p.detach()),
                grad=g,
                indices=state["indices"],
                exp_avg=state["exp_avg"],
                exp_avg_sq=state["exp_avg_sq"],
                max_exp_avg_sq=state.get("max_exp_avg_sq") if group["amsgrad"] else None,
                master=state.get("master_param"),
                grad_compact=is_compact,
                step_slot=self._slot[p],
                lr_slot=self._group_of[p],
                **_hyper(group, lr=False),  # lr lives in the device buffer, read at every step
            )
            _kernel.check_row(row)
            dev = row.param.device
            rows.setdefault(dev, []).append(row)
            positions.setdefault(dev, {})[id(row)] = i
        launches = []
        for dev, rs in rows.items():
            plan = _kernel.StepPlan(rs, self._steps[dev], self._lrs[dev])
            params, _, indices, states = plan.tensors()
            pos = [positions[dev][id(r)] for r in plan.rows]
            launches.append(_Launch(plan, pos, [self._params[i] for i in pos], params, indices, states))
        return _Plan(signature, launches, ref)

    def _refresh(self, grads) -> bool:
        """Point every launch's table at this step's gradients (eager steps; a CUDA
        graph capture gets its own table in the op). False: a parameter's storage
        was replaced or a gradient no longer fits its row, so the step must be
        re-planned."""
        for launch in self._plan.launches:
            if launch.plan.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                continue
            ptrs = [p.data_ptr() for p in launch.owners] if not self._dtensor else [local(p).data_ptr() for p in launch.owners]
            if launch.plan.refresh_grads(ptrs, launch.take(grads)):
                return False
        return True

    def _write_lrs(self, dev: torch.device) -> None:
        """Each group's lr into the device's float64 buffer: a tensor lr every step
        (a graph replays the copy), a float only when it changed."""
        lrs, seen = self._lrs[dev], self._lr_seen[dev]
        for i, group in enumerate(self.param_groups):
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                lrs[i].copy_(lr)
            elif lr != seen[i]:
                lrs[i].fill_(lr)
                seen[i] = lr

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
        grads, compact = self._grads()
        signature = self._signature(grads, compact)
        # Inside torch.compile or a CUDA graph capture the op compares the addresses itself.
        tracing = torch.compiler.is_compiling()
        if self._plan is None or self._plan.signature != signature or not (tracing or self._refresh(grads)):
            self._plan = None
            self._plan = self._build(grads, compact, signature)
            if not tracing and not self._refresh(grads):
                raise RuntimeError("SparseAdamW: a freshly built step plan does not fit its own tensors")
        plan = self._plan
        if not plan.launches and not plan.ref:
            return loss
        if self._compact is not None and (grad_scale is not None or found_inf is not None):
            # GradScaler cannot see compact gradients: add their own non-finite check, on the device.
            dev = next(iter(self._compact.flat))
            found_inf = self._compact.found_inf(dev) + (0 if found_inf is None else _kernel.scalar_on(found_inf, dev))
        for launch in plan.launches:
            dev = launch.plan.device
            self._write_lrs(dev)
            args = (launch.params, launch.take(grads), launch.indices, launch.states, self._steps[dev], self._lrs[dev],
                    _kernel.scalar_on(grad_scale, dev), _kernel.scalar_on(found_inf, dev))
            if tracing:
                torch.ops.gallop.sparse_adamw_step(*args, launch.plan.id, True)
            else:
                # Eager: the op's body without the dispatcher, whose per-tensor argument
                # handling would cost more than the rest of the step; then the version
                # bumps the op's mutation declaration would have made, in one call.
                launch.plan.run(*args, refresh=False)
                torch.autograd.graph.increment_version(launch.mutated)
        for i, p, is_compact in plan.ref:
            group = self.param_groups[self._group_of[p]]
            state = self.state[p]
            reference.sparse_adamw_step(
                p,
                grads[i],
                state["indices"],
                state["exp_avg"],
                state["exp_avg_sq"],
                state.get("max_exp_avg_sq"),
                state["step"],
                **_hyper(group),
                master=state.get("master_param"),
                grad_compact=is_compact,
                grad_scale=grad_scale,
                found_inf=found_inf,
            )
        return loss

    def state_dict(self) -> dict:
        """torch's format; ``state["step"]`` is a copy of the device step counter
        (the live one is a view of the optimizer's buffer)."""
        sd = super().state_dict()
        sd["state"] = {pid: ({**st, "step": st["step"].clone()} if "step" in st else st) for pid, st in sd["state"].items()}
        return sd

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
            if "step" in st and p in self._step_views:
                self._step_views[p].copy_(st["step"])
                state["step"] = self._step_views[p]
        self._version += 1


class _Launch:
    """One device's StepPlan and the op's tensor arguments that do not change
    between steps; ``take`` picks the rows' gradients out of the step's list."""

    def __init__(self, plan, positions: list[int], owners, params, indices, states):
        self.plan, self.positions, self.params, self.indices, self.states = plan, positions, params, indices, states
        self.owners = owners  # the parameters themselves (params holds their detached local tensors)
        self.mutated = params + states + [plan.steps]  # what the op writes

    def take(self, grads: list) -> list:
        return [grads[i] for i in self.positions]


class _Plan:
    """A step laid out: the signature it was built for, the kernel launches, and
    the (position, param, compact) of the parameters on the reference path."""

    def __init__(self, signature: tuple, launches: list[_Launch], ref: list):
        self.signature, self.launches, self.ref = signature, launches, ref


def _hyper(group: dict, lr: bool = True) -> dict:
    """A param group's AdamW hyper-parameters as the update functions take them (``lr`` too
    unless ``lr=False``)."""
    beta1, beta2 = group["betas"]
    return dict(
        **({"lr": float(group["lr"])} if lr else {}),
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        amsgrad=group["amsgrad"],
        maximize=group["maximize"],
    )


def _check_hyper(*, lr, betas, eps, weight_decay) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"Invalid learning rate: a tensor lr must be one floating-point value, got {tuple(lr.shape)} {lr.dtype}")
    elif not (math.isfinite(lr) and lr >= 0):
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
