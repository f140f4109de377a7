"""Compact gradients, clipping and GradScaler steps for SparseAdamW.

:class:`CompactGrads` keeps the selected gradient entries of every parameter in
one flat float32 buffer per device, filled by post-accumulate-grad hooks as
backward produces each gradient (the dense ``.grad`` is freed at once). The
buffers never move, so the optimizer's step table keeps their addresses, and a
whole-model check (non-finite entries, norms) is one op per device.

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

from ..distributed import gather, local


class CompactGrads:
    """Selected gradient entries of ``params``, gathered in backward.

    params: (param, indices) pairs; indices are flat int64 indices on the
    parameter's device. The buffers are views of one float32 tensor per device;
    :meth:`clear` marks them empty (and zeroes them, so a whole-buffer check sees
    no stale entries) without freeing them.
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
        self.filled: set[torch.Tensor] = set()
        # A weak reference: the parameters must not keep a dropped optimizer's buffers alive.
        me = weakref.ref(self)

        def hook(p: torch.Tensor) -> None:
            grads = me()
            if grads is not None:
                grads.gather(p)

        self._hooks = [p.register_post_accumulate_grad_hook(hook) for p, _ in params]

    def remove_hooks(self) -> None:
        """Unregister the hooks (backward then leaves dense ``.grad`` again)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @torch.no_grad()
    def gather(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: put the selected entries of p.grad into its
        buffer, or add them, then free the dense gradient: one op for a float32
        gradient's first micro-batch, else a gather and one cast or add."""
        g = p.grad
        buf = self.buffers.get(p)
        if g is None or buf is None or g.is_sparse or g.shape != p.shape:
            return  # a malformed gradient stays in .grad for step() to report
        idx, g = self.indices[p], local(g)
        if p not in self.filled and g.dtype == torch.float32:
            torch.take(g, idx, out=buf)  # one op: gathered straight into the buffer
        elif p not in self.filled:
            buf.copy_(torch.take(g, idx))  # gather, then one cast into the buffer
        else:
            buf.add_(torch.take(g, idx))  # gather, then one add (with the cast) into the buffer
        self.filled.add(p)
        p.grad = None

    def clear(self, set_to_none: bool = True) -> None:
        """Empty the buffers (set_to_none) or hold zeros in them."""
        for flat in self.flat.values():
            flat.zero_()
        self.filled = set() if set_to_none else set(self.buffers)

    def grad(self, p: torch.Tensor) -> torch.Tensor | None:
        """p's compact gradient, or None when backward gave it none since :meth:`clear`."""
        return self.buffers[p] if p in self.filled else None

    def nbytes(self) -> int:
        """Bytes of the buffers that hold a gradient."""
        return sum(self.buffers[p].numel() * 4 for p in self.filled)

    def found_inf(self, device: torch.device) -> torch.Tensor:
        """1.0 on ``device`` when any compact entry is Inf/NaN, else 0.0: one check per buffer device."""
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
    they do not count.
    """
    max_norm, norm_type = float(max_norm), float(norm_type)
    entries, to_scale = [], []
    for p, idx in opt._indices.items():
        buf = opt._compact.grad(p) if opt._compact is not None else None
        if not idx.numel() or (buf is None and p.grad is None):
            continue
        sel = buf
        if p.grad is not None:
            dense = gather(p.grad, idx).float()
            sel = dense if sel is None else sel + dense
            to_scale.append(p.grad)
        if buf is not None:
            to_scale.append(buf)
        entries.append(sel)
    if not entries:
        return torch.tensor(0.0)
    dev = entries[0].device
    norms = [n.to(dev) for n in torch._foreach_norm(entries, norm_type)]
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(f"the total norm of order {norm_type} of the selected gradients is non-finite")
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for device in {t.device for t in to_scale}:
        torch._foreach_mul_([t for t in to_scale if t.device == device], coef.to(device))
    return total


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
    dense = [local(p.grad) for p in opt._indices if p.grad is not None]
    if dense:
        found = found + torch.stack([(~torch.isfinite(g)).any().to(scale.device) for g in dense]).any().float()
    found = found.clamp(max=1.0).reshape(1)
    opt.step(grad_scale=scale, found_inf=found)
    new_scale = scale.clone()
    torch._amp_update_scale_(
        new_scale, growth_tracker, found, scaler.get_growth_factor(), scaler.get_backoff_factor(), scaler.get_growth_interval()
    )
    scaler.update(new_scale)
