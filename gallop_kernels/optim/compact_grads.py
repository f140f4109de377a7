"""Compact gradients, clipping and GradScaler steps for SparseAdamW.

:class:`CompactGrads` keeps the selected gradient entries of every parameter in
one flat float32 buffer per device, filled by post-accumulate-grad hooks as
backward produces each gradient. The dense gradient is freed at once and
``.grad`` becomes a :class:`CompactGrad`: a tensor of the parameter's shape
with no storage that stands for the buffer. The buffers never move, so the
optimizer's step table keeps their addresses, and a whole-model check
(non-finite entries, norms) is one op per device.

Why a stand-in rather than ``.grad = None``: whatever clears gradients
(``model.zero_grad()``, ``opt.zero_grad()``, ``p.grad = None``) then clears the
compact gradient too, since a buffer counts only while its stand-in is the
parameter's ``.grad``; code that reads gradients through ``.grad``
(``torch.nn.utils.clip_grad_norm_``, which transformers.Trainer calls through
accelerate, GradScaler's unscale) reaches the buffer; and anything else done to
it raises instead of quietly seeing no gradient.

:func:`clip_grad_norm_` clips by the norm of the selected entries only, and
:func:`amp_step` is ``scaler.step(opt); scaler.update()`` for an optimizer whose
gradients GradScaler cannot see. It uses GradScaler's public API only:
``scaler.scale`` for the scale tensor and ``scaler.update(new_scale)`` for the
new scale, whose growth/backoff it computes on the device with the scaler's
own factors, so no host sync and no write into the scaler's private state.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

from ..distributed import dtensor_group, gather, local

aten = torch.ops.aten
# Ops that act on each entry alone, or reduce all entries to one number: on a CompactGrad
# they act on its buffer, which is the selected entries (the others never reach the weights).
# These are what zero_grad, clip_grad_norm_/clip_grad_value_ (both foreach paths) and
# GradScaler's unscale_ call on gradients.
_ON_BUFFER = {
    aten.zero_.default, aten.mul_.Tensor, aten.mul_.Scalar, aten.div_.Tensor, aten.div_.Scalar,
    aten.clamp_.default, aten.clamp_min_.default, aten.clamp_max_.default,
    aten._foreach_zero_.default, aten._foreach_mul_.Tensor, aten._foreach_mul_.Scalar,
    aten._foreach_div_.Tensor, aten._foreach_div_.Scalar, aten._foreach_clamp_min_.Scalar,
    aten._foreach_clamp_max_.Scalar, aten._foreach_norm.Scalar, aten._amp_foreach_non_finite_check_and_unscale_.default,
}
_IN_PLACE = {aten.zero_.default, aten.mul_.Tensor, aten.mul_.Scalar, aten.div_.Tensor, aten.div_.Scalar,
             aten.clamp_.default, aten.clamp_min_.default, aten.clamp_max_.default}


class CompactGrad(torch.Tensor):
    """The ``.grad`` of a parameter whose gradient lives in a compact buffer.

    Shape, dtype and device are the parameter's; it has no storage. Zeroing,
    scaling, clamping and unscaling act on the buffer, a norm is the buffer's
    norm (the selected entries'), accumulating a dense gradient (what backward
    does) adds its selected entries; every other op raises.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl  # results of ops stay plain tensors

    @staticmethod
    def __new__(cls, param: torch.Tensor, owner: CompactGrads):
        g = torch.Tensor._make_wrapper_subclass(cls, param.shape, dtype=param.dtype, device=param.device)
        g.buffer, g.indices, g.owner = owner.buffers[param], owner.indices[param], owner
        return g

    def __repr__(self) -> str:
        return f"CompactGrad(shape={tuple(self.shape)}, dtype={self.dtype}, {self.buffer.numel()} selected entries)"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.add_.Tensor and type(args[0]) is cls and type(args[1]) is not cls:
            args[0]._accumulate(args[1], kwargs.get("alpha", 1))
            return args[0]
        if func in (aten.detach_.default, aten.detach.default):
            return args[0]  # zero_grad(set_to_none=False) detaches before zeroing
        whole_norm = func is aten.linalg_vector_norm.default and (args[2:3] or [kwargs.get("dim")])[0] is None
        if not (whole_norm or func in _ON_BUFFER):
            raise RuntimeError(
                f"{func} on a compact gradient: with SparseAdamW(compact_grads=True) a parameter's .grad stands "
                f"for its selected entries only and supports zero_grad, torch.nn.utils.clip_grad_norm_ / "
                f"clip_grad_value_ and GradScaler; for anything else call opt.remove_hooks() first, or train with "
                f"compact_grads=False (backward(create_graph=True) is not supported either)")
        out = func(*tree_map(lambda t: t.buffer if type(t) is cls else t, args), **kwargs)
        return args[0] if func in _IN_PLACE else out

    def _accumulate(self, grad: torch.Tensor, alpha) -> None:
        """What backward's ``.grad += new`` does here: add new's selected entries."""
        if grad.is_sparse or grad.shape != self.shape:
            raise RuntimeError(f"compact gradient: cannot accumulate a {'sparse' if grad.is_sparse else 'dense'} "
                               f"gradient of shape {tuple(grad.shape)} into one of shape {tuple(self.shape)}")
        self.buffer.add_(local(grad).reshape(-1).index_select(0, self.indices), alpha=alpha)


class CompactGrads:
    """Selected gradient entries of ``params``, gathered in backward.

    params: (param, indices) pairs; indices are flat indices (int32 or int64) on
    the parameter's device. The buffers are views of one float32 tensor per device;
    a buffer holds p's gradient while ``p.grad`` is its :class:`CompactGrad`.
    """

    def __init__(self, params: list[tuple[torch.Tensor, torch.Tensor]]):
        by_device: dict[torch.device, list] = {}
        for p, idx in params:
            by_device.setdefault(idx.device, []).append((p, idx))
        self.flat: dict[torch.device, torch.Tensor] = {}
        self.buffers: dict[torch.Tensor, torch.Tensor] = {}
        self.indices: dict[torch.Tensor, torch.Tensor] = {}
        for dev, items in by_device.items():
            flat = torch.zeros(sum(idx.numel() for _, idx in items), dtype=torch.float32, device=dev)
            self.flat[dev] = flat
            for (p, idx), view in zip(items, flat.split([idx.numel() for _, idx in items])):
                self.buffers[p] = view
                self.indices[p] = idx
        # A weak reference: the parameters must not keep a dropped optimizer's buffers alive.
        me = weakref.ref(self)

        def hook(p: torch.Tensor) -> None:
            grads = me()
            if grads is not None:
                grads.gather(p)

        self._hooks = [p.register_post_accumulate_grad_hook(hook) for p, _ in params]

    def remove_hooks(self) -> None:
        """Unregister the hooks and drop the compact gradients (backward then leaves dense ``.grad`` again)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for p in self.buffers:
            if self.holds(p):
                p.grad = None

    def holds(self, p: torch.Tensor) -> bool:
        """Whether p's gradient is in its buffer: ``p.grad`` is this object's CompactGrad."""
        g = p.grad
        return type(g) is CompactGrad and g.owner is self

    @torch.no_grad()
    def gather(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: a dense p.grad (backward's first gradient since
        .grad was cleared) goes into p's buffer, overwriting it, in one op for a
        float32 gradient (else a gather and one cast), and becomes p's CompactGrad.
        Later micro-batches were already added by CompactGrad's accumulate."""
        g = p.grad
        buf = self.buffers.get(p)
        if type(g) is CompactGrad:
            if g.owner is not self:
                raise RuntimeError("a parameter's .grad holds the compact gradient of another SparseAdamW; "
                                   "call that optimizer's zero_grad() or remove_hooks() first")
            return
        if g is None or buf is None or g.is_sparse or g.shape != p.shape:
            return  # a malformed gradient stays in .grad for step() to report
        g = local(g).reshape(-1)
        if g.dtype == torch.float32:
            torch.index_select(g, 0, self.indices[p], out=buf)  # one op: gathered straight into the buffer
        else:
            buf.copy_(g.index_select(0, self.indices[p]))  # gather, then one cast into the buffer
        p.grad = CompactGrad(p, self)

    def grad(self, p: torch.Tensor) -> torch.Tensor | None:
        """p's compact gradient (its buffer), or None when ``p.grad`` is not its CompactGrad."""
        return self.buffers[p] if self.holds(p) else None

    def nbytes(self) -> int:
        """Bytes of the buffers that hold a gradient."""
        return sum(buf.numel() * 4 for p, buf in self.buffers.items() if self.holds(p))

    def found_inf(self, device: torch.device) -> torch.Tensor:
        """1.0 on ``device`` when any compact gradient has an Inf/NaN, else 0.0: one check per buffer device."""
        stale = [buf for p, buf in self.buffers.items() if not self.holds(p)]
        if stale:  # a cleared .grad leaves its old entries behind: zero them for the whole-buffer check
            torch._foreach_zero_(stale)
        bad = [(~torch.isfinite(flat)).any().to(device) for flat in self.flat.values()]
        return torch.stack(bad).any().float() if len(bad) > 1 else bad[0].float().reshape(())


@torch.no_grad()
def clip_grad_norm_(opt, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
    """Clip the selected gradient entries of ``opt`` by their total norm; returns that norm.

    The formula of ``torch.nn.utils.clip_grad_norm_`` (per-tensor norms in
    float32, then their norm; coefficient ``max_norm / (norm + 1e-6)`` clamped to
    1) over the entries the optimizer trains: the compact buffers with
    ``compact_grads``, the selected entries of ``.grad`` otherwise (the whole
    ``.grad`` is then scaled). Unselected entries never reach the weights, so
    they do not count. Under FSDP2 (DTensor parameters) each rank's norm of its
    shards' entries is combined over the mesh's process group, so every rank
    clips by the norm of the whole model's selected entries.
    """
    max_norm, norm_type = float(max_norm), float(norm_type)
    entries, to_scale = [], []
    for p, idx in opt._indices.items():
        buf = opt._compact.grad(p) if opt._compact is not None else None
        if not idx.numel() or p.grad is None:
            continue
        entries.append(buf if buf is not None else gather(p.grad, idx).float())
        to_scale.append(buf if buf is not None else p.grad)
    group = dtensor_group(list(opt._indices))
    if not entries and group is None:
        return torch.tensor(0.0)
    dev = entries[0].device if entries else local(next(iter(opt._indices))).device
    norms = [n.to(dev) for n in torch._foreach_norm(entries, norm_type)] if entries else []
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type) if norms else torch.zeros((), device=dev)
    if group is not None:  # FSDP2: this rank holds only its shards' entries; every rank clips by the global norm
        total = _over_ranks(total, norm_type, group)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(f"the total norm of order {norm_type} of the selected gradients is non-finite")
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for device in {t.device for t in to_scale}:
        torch._foreach_mul_([t for t in to_scale if t.device == device], coef.to(device))
    return total


def _over_ranks(total: torch.Tensor, norm_type: float, group) -> torch.Tensor:
    """The norm over every rank's entries from each rank's ``total`` norm of its own: the max for
    the inf-norm, else (sum over ranks of total**p)**(1/p)."""
    if norm_type == float("inf"):
        total = total.clone()
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
        return total
    powered = total.double() ** norm_type  # float64: the sum of powers neither overflows nor loses the small ones
    dist.all_reduce(powered, group=group)
    return (powered ** (1.0 / norm_type)).to(total.dtype)


@torch.no_grad()
def amp_step(opt, scaler, growth_tracker: torch.Tensor) -> None:
    """``scaler.step(opt)`` then ``scaler.update()``, for gradients the scaler cannot see.

    Steps with the scaler's scale, skips on the device when a gradient (compact
    or dense) has an Inf/NaN, and hands the scaler its next scale through
    ``scaler.update(new_scale)``, grown or backed off as GradScaler.update would
    with the scaler's factors. growth_tracker: an int32 tensor on the scale's
    device holding the steps since the last backoff (the optimizer owns it).
    """
    scale = scaler.scale(torch.ones((), dtype=torch.float32, device=growth_tracker.device))
    found = opt._compact.found_inf(scale.device)
    dense = [local(p.grad) for p in opt._indices if p.grad is not None and not opt._compact.holds(p)]
    if dense:
        found = found + torch.stack([(~torch.isfinite(g)).any().to(scale.device) for g in dense]).any().float()
    found = found.clamp(max=1.0).reshape(1)
    opt.step(grad_scale=scale, found_inf=found)
    new_scale = scale.clone()
    torch._amp_update_scale_(
        new_scale, growth_tracker, found, scaler.get_growth_factor(), scaler.get_backoff_factor(), scaler.get_growth_interval()
    )
    scaler.update(new_scale)
