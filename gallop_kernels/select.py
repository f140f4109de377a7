"""select_mask: pick the weights GaLLoP trains, and the Selection that holds them."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from . import _ext, reference
from ._env import backends
from ._ext import require_ext
from .distributed import GroupComm, check_same_selection, dtensor_group, index_dtype, local, shard_starts
from .ops.select_host import topk_keys_host
from .reference import CRITERIA, GRADIENT_CRITERIA, SCOPES, SUPPORTED_DTYPES, LocalComm, Source



class Selection(Mapping):
    """The selected weights: parameter name -> sorted flat indices, int32 for a
    tensor of fewer than 2^31 weights and int64 from 2^31 on (half the memory;
    :func:`gallop_kernels.distributed.index_dtype`), whatever dtype they are given in.

    Flat indices address ``param.reshape(-1)``; for an FSDP2 (DTensor)
    parameter they address this rank's local shard, and ``shapes`` holds the
    local shapes. Built by :func:`select_mask`; saved and restored with
    :meth:`state_dict` / :meth:`load_state_dict`.
    """

    def __init__(
        self,
        indices: dict[str, torch.Tensor],
        shapes: dict[str, torch.Size],
        *,
        rho: float,
        criterion: str,
        scope: str,
        threshold: float | dict[str, float] | None,
    ):
        self.shapes = {n: torch.Size(s) for n, s in shapes.items()}
        self._indices = {n: i.to(index_dtype(math.prod(self.shapes[n]))) for n, i in indices.items()}
        self.rho = rho
        self.criterion = criterion
        self.scope = scope
        self.threshold = threshold
        """Score of the last weight taken: one float for scope="global", a
        name -> float dict for "per_tensor" (None where nothing was taken)."""
        self.bytes_exchanged = 0
        """Bytes this rank sent to other ranks while selecting (not saved)."""

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._indices[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)

    def __repr__(self) -> str:
        return (
            f"Selection(criterion={self.criterion!r}, scope={self.scope!r}, rho={self.rho}, "
            f"num_selected={self.num_selected}, num_total={self.num_total}, tensors={len(self)})"
        )

    @property
    def num_selected(self) -> int:
        """Number of selected weights over all parameters."""
        return sum(int(i.numel()) for i in self._indices.values())

    @property
    def num_total(self) -> int:
        """Number of weights the selection was made over."""
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def density(self) -> float:
        """num_selected / num_total."""
        return self.num_selected / self.num_total if self.num_total else 0.0

    def masks(self) -> dict[str, torch.Tensor]:
        """Boolean masks shaped like each parameter, True where selected."""
        out = {}
        for name, idx in self._indices.items():
            m = torch.zeros(math.prod(self.shapes[name]), dtype=torch.bool, device=idx.device)
            m[idx] = True
            out[name] = m.view(self.shapes[name])
        return out

    def to(self, device: torch.device | str) -> Selection:
        """A copy with every index tensor on ``device``."""
        return Selection(
            {n: i.to(device) for n, i in self._indices.items()},
            self.shapes,
            rho=self.rho,
            criterion=self.criterion,
            scope=self.scope,
            threshold=self.threshold,
        )

    def state_dict(self) -> dict:
        """Everything needed to rebuild this selection (indices on the CPU)."""
        return {
            "version": 1,
            "indices": {n: i.cpu() for n, i in self._indices.items()},
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "rho": self.rho,
            "criterion": self.criterion,
            "scope": self.scope,
            "threshold": self.threshold,
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace this selection by one saved with :meth:`state_dict`."""
        if state.get("version") != 1:
            raise ValueError(f"unsupported Selection state version {state.get('version')!r}; expected 1")
        missing = [k for k in ("indices", "shapes", "rho", "criterion", "scope", "threshold") if k not in state]
        if missing:
            raise ValueError(f"Selection state lacks {', '.join(map(repr, missing))}: expected what state_dict() returns")
        shapes = {n: torch.Size(s) for n, s in state["shapes"].items()}
        indices = dict(state["indices"])
        if set(shapes) != set(indices):
            raise ValueError("Selection state: 'indices' and 'shapes' name different parameters")
        for name, idx in indices.items():
            _check_indices(name, idx, math.prod(shapes[name]))
        self.__init__(
            indices,
            shapes,
            rho=state["rho"],
            criterion=state["criterion"],
            scope=state["scope"],
            threshold=state["threshold"],
        )

    @classmethod
    def from_state_dict(cls, state: dict) -> Selection:
        """Build a Selection from :meth:`state_dict` output."""
        sel = cls.__new__(cls)
        sel.load_state_dict(state)
        return sel

    def check_matches(self, name: str, param: torch.Tensor) -> None:
        """Raise ValueError unless ``param`` is the parameter this selection was made for."""
        if name not in self._indices:
            raise ValueError(f"parameter {name!r} is not in the selection (it has {len(self)} parameters)")
        param = local(param)
        if param.shape != self.shapes[name]:
            raise ValueError(
                f"parameter {name!r} has shape {tuple(param.shape)} but was selected with shape "
                f"{tuple(self.shapes[name])}: the model changed after selection"
            )


def _check_indices(name: str, idx: torch.Tensor, numel: int) -> None:
    if idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1:
        raise ValueError(f"parameter {name!r}: selection indices must be a 1-D int32 or int64 tensor, "
                         f"got {idx.dtype} {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
        raise ValueError(
            f"parameter {name!r}: selection index out of range [0, {numel}) "
            f"(min {int(idx.min())}, max {int(idx.max())})"
        )
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"parameter {name!r}: selection indices must be sorted and unique")


# ----------------------------------------------------------------------------
# select_mask
# ----------------------------------------------------------------------------

# The one list of selection backends: name -> topk_keys-like function, or the
# exception that made it unavailable (kept so that asking for it says why).
_TOPK_BACKENDS: dict[str, object] = {"reference": reference.topk_keys}
try:  # the package imports without a working triton
    from .ops.select_triton import topk_keys_triton

    _TOPK_BACKENDS["triton"] = topk_keys_triton
except (ImportError, RuntimeError) as err:
    _TOPK_BACKENDS["triton"] = err
# The compiled extension's CPU passes: usable when gallop_kernels._C imported
# (checked per call, see _pick_backend).
_TOPK_BACKENDS["host"] = topk_keys_host


def _validate_args(rho, criterion, eps, scope, backend):
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (0.0 < rho <= 1.0):
        raise ValueError(f"rho must be a number in (0, 1], got {rho!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; expected one of {CRITERIA}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if backend != "auto" and backend not in _TOPK_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {tuple(_TOPK_BACKENDS)}")


def _checked_grad(name: str, p: torch.Tensor, grads: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    """The gradient select_mask uses for ``p``, after checking it fits."""
    g = p.grad if grads is None else grads.get(name)
    if g is None:
        where = "its .grad is None (run backward first)" if grads is None else "it is missing from grads"
        raise ValueError(f"parameter {name!r} has no gradient: {where}")
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"grads[{name!r}] must be a tensor, got {type(g).__name__}")
    check_grad(name, p, g)
    return g


def check_grad(name: str, param: torch.Tensor, grad: torch.Tensor) -> None:
    """Raise, naming the parameter, unless ``grad`` is a dense gradient of ``param``'s
    shape and device in a supported dtype (select_mask and SparseAdamW both check this)."""
    if grad.is_sparse:
        raise TypeError(f"parameter {name!r}: sparse gradients are not supported")
    if grad.shape != param.shape:
        raise ValueError(f"parameter {name!r}: gradient shape {tuple(grad.shape)} != parameter shape {tuple(param.shape)}")
    if grad.device != param.device:
        raise ValueError(f"parameter {name!r}: gradient on {grad.device} but parameter on {param.device}")
    if grad.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"parameter {name!r}: gradient dtype {grad.dtype} is not supported; expected one of {SUPPORTED_DTYPES}"
        )


def _sources(model: nn.Module, grads: Mapping[str, torch.Tensor] | None, needs_grad: bool):
    """Validated (name, local param, local grad, global offset) Sources, and the
    DTensor process group (None unless the parameters are FSDP2 shards)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    if grads is not None and not isinstance(grads, Mapping):
        hint = f"; to pass rho, write rho={grads!r}" if isinstance(grads, (int, float)) else ""
        raise TypeError(f"grads must be a mapping of parameter name -> gradient tensor (or None: each parameter's "
                        f".grad), got {type(grads).__name__}{hint}")
    if grads is not None:
        unknown = set(grads) - {n for n, _ in named}
        if unknown:
            raise ValueError(f"grads has entries that are not trainable parameters of the model: {sorted(unknown)}")
    params = [p for _, p in named]
    group = dtensor_group(params)
    starts = shard_starts(params, group) if group is not None else [0] * len(params)
    sources, offset = [], 0
    for (name, p), start in zip(named, starts):
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"parameter {name!r}: dtype {p.dtype} is not supported; expected one of {SUPPORTED_DTYPES}")
        g = _checked_grad(name, p, grads) if needs_grad else None
        lg = local(g)
        sources.append(Source(name, local(p).detach(), None if lg is None else lg.detach(), offset + start))
        offset += p.numel()  # the full parameter's size: positions are global
    return sources, group


def _pick_backend(backend: str, sources: list[Source], distributed: bool) -> str:
    if distributed:
        if backend not in ("auto", "reference"):
            raise ValueError(f"backend {backend!r} does not run across ranks yet; use backend='reference' or 'auto'")
        return "reference"
    if backend != "auto":
        found = _TOPK_BACKENDS[backend]
        if isinstance(found, BaseException):
            raise RuntimeError(f"backend={backend!r} is unavailable: importing it failed") from found
        if backend == "triton" and not backends()["triton"]:
            raise ValueError("backend='triton' needs a CUDA device, or TRITON_INTERPRET=1 set before triton is imported")
        if backend == "host":
            require_ext("backend='host'")
        return backend
    if any(s.param.is_cuda for s in sources):
        return "triton" if not isinstance(_TOPK_BACKENDS["triton"], BaseException) else "reference"
    return "host" if _ext._C is not None else "reference"


@torch.no_grad()
def select_mask(
    model: nn.Module,
    grads: Mapping[str, torch.Tensor] | None = None,
    rho: float = 0.01,
    *,
    criterion: str = "gallop",
    eps: float = 1e-8,
    scope: str = "global",
    seed: int = 0,
    backend: str = "auto",
    process_group=None,
) -> Selection:
    """Select exactly round(rho * N) trainable weights of ``model`` by ``criterion``.

    ``grads`` maps parameter names to gradients (default: each parameter's
    ``.grad``); criteria pafi, magnitude and random need none. ``scope="global"``
    uses one threshold over all weights (the paper), ``"per_tensor"`` takes rho of
    each tensor. Ties go to the earlier parameter, then the lower flat index.

    Across ranks: FSDP2 (DTensor) parameters are selected jointly over their
    mesh, each rank getting the indices of its own shards; with replicated
    parameters (DDP) pass ``process_group`` to check that every rank selected
    the same weights. Call it on every rank then.
    """
    _validate_args(rho, criterion, eps, scope, backend)
    sources, shard_group = _sources(model, grads, criterion in GRADIENT_CRITERIA)
    comm = GroupComm(shard_group) if shard_group is not None else LocalComm()
    name = _pick_backend(backend, sources, shard_group is not None)
    topk = _TOPK_BACKENDS[name]
    extra = {"comm": comm} if name == "reference" else {}
    shapes = {s.name: s.param.shape for s in sources}
    full_numel = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}  # not the shards'

    def run(group: list[Source]):
        k = reference.num_to_select(rho, sum(full_numel[s.name] for s in group))
        idx, key = topk(group, k, criterion, eps, seed, **extra)
        return idx, (None if key is None else reference.key_to_score(key))

    if scope == "global":
        idx, threshold = run(sources)
        indices = {s.name: i for s, i in zip(sources, idx)}
    else:
        indices, threshold = {}, {}
        for s in sources:
            (indices[s.name],), threshold[s.name] = run([s])
    if process_group is not None and shard_group is None:
        check_same_selection(indices, process_group, device=sources[0].param.device)
    sel = Selection(indices, shapes, rho=rho, criterion=criterion, scope=scope, threshold=threshold)
    sel.bytes_exchanged = comm.bytes_sent
    return sel
