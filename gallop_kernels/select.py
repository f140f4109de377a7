"""select_mask: pick the weights GaLLoP trains, and the Selection that holds them."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from . import _env, _ext, keys, reference
from ._ext import require_ext
from .distributed import GroupComm, check_same_selection, dtensor_group, index_dtype, is_dtensor, local, shard_starts
from .ops.select_host import topk_keys_host
from .keys import Source
from .restricted import Pool
from .reference import CRITERIA, GRADIENT_CRITERIA, SCOPES, SUPPORTED_DTYPES, LocalComm



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

    def __eq__(self, other: object) -> bool:
        """Equal when everything :meth:`state_dict` saves is: the same parameter names and
        shapes, the same indices (wherever they live), rho, criterion, scope and threshold."""
        if not isinstance(other, Selection):
            return NotImplemented
        meta = ("shapes", "rho", "criterion", "scope", "threshold")  # shapes name the parameters
        if any(getattr(self, a) != getattr(other, a) for a in meta):
            return False
        return all(torch.equal(i.cpu(), other[n].cpu()) for n, i in self._indices.items())

    __hash__ = None  # mutable (load_state_dict), so unhashable, as a dict is

    def __or__(self, other: Selection) -> Selection:
        """The weights in either selection (e.g. the kept ones and the regrown ones)."""
        return self._combine(other, lambda a, b: torch.unique(torch.cat([a, b])))

    def __sub__(self, other: Selection) -> Selection:
        """The weights of this selection that ``other`` lacks (e.g. the dropped ones)."""
        return self._combine(other, lambda a, b: a[~torch.isin(a, b)])

    def _combine(self, other: object, op) -> Selection:
        """A Selection of the same parameters with per-parameter indices ``op(mine, other's)``;
        it keeps this one's criterion and scope, its rho is its density, its threshold None."""
        if not isinstance(other, Selection):
            return NotImplemented
        if self.shapes != other.shapes:
            raise ValueError("the two selections were made over different parameters or shapes")
        indices = {n: op(i, other[n].to(i.device)) for n, i in self._indices.items()}
        total = self.num_total
        rho = sum(int(i.numel()) for i in indices.values()) / total if total else 0.0
        return Selection(indices, self.shapes, rho=rho, criterion=self.criterion, scope=self.scope, threshold=None)

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


def _check_indices(name: str, idx: torch.Tensor, numel: int, what: str = "selection") -> None:
    if idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1:
        raise ValueError(f"parameter {name!r}: {what} indices must be a 1-D int32 or int64 tensor, "
                         f"got {idx.dtype} {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
        raise ValueError(
            f"parameter {name!r}: {what} index out of range [0, {numel}) "
            f"(min {int(idx.min())}, max {int(idx.max())})"
        )
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"parameter {name!r}: {what} indices must be sorted and unique")


# ----------------------------------------------------------------------------
# select_mask
# ----------------------------------------------------------------------------

SELECTION_BACKENDS = ("reference", "triton", "host")
# name -> topk_keys-like function. host: the compiled extension's CPU passes, usable when
# gallop_kernels._C imported (checked per call, see _pick_backend). triton: _env holds it,
# or the exception that made it unavailable (see topk_function).
_TOPK_BACKENDS: dict[str, object] = {"reference": reference.topk_keys, "host": topk_keys_host}


def topk_function(backend: str):
    """The topk_keys-like function of a selection backend, or the exception that made it unavailable."""
    return _env.TRITON_SELECTION if backend == "triton" else _TOPK_BACKENDS[backend]


def _validate_args(rho, k, criterion, eps, scope, seed, backend):
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if rho is not None and k is not None:
        raise ValueError(f"give rho or k, not both (rho={rho!r}, k={k!r})")
    if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0):
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    if k is not None and scope != "global":
        raise ValueError(f"k counts weights over all parameters: use scope='global' (got scope={scope!r}), or rho")
    if rho is not None and (isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (0.0 < rho <= 1.0)):
        raise ValueError(f"rho must be a number in (0, 1], got {rho!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; expected one of {CRITERIA}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if backend != "auto" and backend not in SELECTION_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {SELECTION_BACKENDS}")


def _checked_restriction(what: str, given, named: list[tuple[str, torch.Tensor]], criterion: str):
    """``among`` / ``exclude`` checked against the model: name -> sorted unique local flat
    indices on the parameter's device (None stays None)."""
    if given is None:
        return None
    if not isinstance(given, Mapping):
        raise TypeError(f"{what} must be a Selection or a mapping of parameter name -> flat indices, "
                        f"got {type(given).__name__}")
    if criterion == "random":  # its score hashes the position, which a restricted selection renumbers
        raise ValueError(f"criterion='random' does not take {what}=")
    params = dict(named)
    unknown = set(given) - set(params)
    if unknown:
        raise ValueError(f"{what} names parameters that are not trainable parameters of the model: {sorted(unknown)}")
    out = {}
    for name, idx in given.items():
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"{what}[{name!r}] must be a tensor of flat indices, got {type(idx).__name__}")
        _check_indices(name, idx, local(params[name]).numel(), what)
        out[name] = idx.to(params[name].device)
    return out


def _checked_grad(name: str, p: torch.Tensor, grads: Mapping[str, torch.Tensor] | None,
                  among: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """The gradient select_mask uses for ``p``, after checking it fits, and whether it is
    compact (one value per index of ``among``, the parameter's competing weights)."""
    g = p.grad if grads is None else grads.get(name)
    if g is None:
        where = "its .grad is None (run backward first)" if grads is None else "it is missing from grads"
        raise ValueError(f"parameter {name!r} has no gradient: {where}")
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"grads[{name!r}] must be a tensor, got {type(g).__name__}")
    if among is not None and g.shape == (among.numel(),) and g.shape != p.shape and not g.is_sparse:
        check_grad(name, among, g, host_ok=not is_dtensor(p))  # among has the compact shape and p's device
        return g, True
    check_grad(name, p, g, host_ok=True)
    return g, False


def check_grad(name: str, param: torch.Tensor, grad: torch.Tensor, *, host_ok: bool = False) -> None:
    """Raise, naming the parameter, unless ``grad`` is a dense gradient of ``param``'s
    shape and device in a supported dtype (select_mask and SparseAdamW both check this).
    ``host_ok``: a CPU gradient of a parameter on another device passes too (offloaded estimation),
    and for an FSDP2 (DTensor) parameter a plain tensor of its local shard (offloaded under FSDP2)."""
    if host_ok and is_dtensor(param) and not is_dtensor(grad):
        param = local(param)  # this rank's host sums: compared with its shard
    if grad.is_sparse:
        raise TypeError(f"parameter {name!r}: sparse gradients are not supported")
    if grad.shape != param.shape:
        raise ValueError(f"parameter {name!r}: gradient shape {tuple(grad.shape)} != parameter shape {tuple(param.shape)}")
    if grad.device != param.device and not (host_ok and grad.device.type == "cpu" and not is_dtensor(param)):
        raise ValueError(f"parameter {name!r}: gradient on {grad.device} but parameter on {param.device}")
    if grad.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"parameter {name!r}: gradient dtype {grad.dtype} is not supported; expected one of {SUPPORTED_DTYPES}"
        )


def _trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of every trainable parameter, in named_parameters() order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    return named


def _sources(named: list[tuple[str, torch.Tensor]], grads: Mapping[str, torch.Tensor] | None, needs_grad: bool,
             among: dict[str, torch.Tensor] | None = None):
    """Validated (name, local param, local grad, global offset) Sources, the DTensor
    process group (None unless the parameters are FSDP2 shards) and the names whose
    gradient is compact (see _checked_grad). With ``among``, only parameters it names
    need a gradient."""
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
    sources, compact, offset = [], set(), 0
    for (name, p), start in zip(named, starts):
        if p.is_meta:  # no data to score (a model built under torch.device("meta"), not yet loaded)
            raise ValueError(f"parameter {name!r} is on the meta device: load or materialize the weights first")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"parameter {name!r}: dtype {p.dtype} is not supported; expected one of {SUPPORTED_DTYPES}")
        g = None
        if needs_grad and (among is None or name in among):
            g, is_compact = _checked_grad(name, p, grads, None if among is None else among[name])
            if is_compact:
                compact.add(name)
            g = local(g).detach()
        sources.append(Source(name, local(p).detach(), g, offset + start))
        offset += p.numel()  # the full parameter's size: positions are global
    return sources, group, compact


def _on_host_if_needed(sources: list[Source], among, exclude):
    """Host gradients of parameters on another device (``estimate_gradients(offload=True)``) are
    scored on the host: then every Source's theta is a host copy and ``among`` / ``exclude`` are
    on the host too (one device for the whole selection); otherwise all three as they are."""
    if not any(s.grad is not None and s.grad.device != s.param.device for s in sources):
        return sources, among, exclude
    on_host = lambda r: None if r is None else {n: i.cpu() for n, i in r.items()}  # noqa: E731
    sources = [Source(s.name, s.param.cpu(), None if s.grad is None else s.grad.cpu(), s.offset) for s in sources]
    return sources, on_host(among), on_host(exclude)


def _pick_backend(backend: str, sources: list[Source], distributed: bool) -> str:
    if distributed:
        if backend not in ("auto", "reference"):
            raise ValueError(f"backend {backend!r} does not run across ranks yet; use backend='reference' or 'auto'")
        return "reference"
    if backend != "auto":
        found = topk_function(backend)
        if isinstance(found, BaseException):
            raise RuntimeError(f"backend={backend!r} is unavailable: importing it failed") from found
        if backend == "triton" and not _env.backends()["triton"]:
            raise ValueError("backend='triton' needs a CUDA device, or TRITON_INTERPRET=1 set before triton is imported")
        if backend == "host":
            require_ext("backend='host'")
        return backend
    if any(s.param.is_cuda for s in sources):
        return "triton" if not isinstance(_env.TRITON_SELECTION, BaseException) else "reference"
    return "host" if _ext._C is not None else "reference"


@torch.no_grad()
def select_mask(
    model: nn.Module,
    grads: Mapping[str, torch.Tensor] | None = None,
    rho: float | None = None,
    *,
    k: int | None = None,
    criterion: str = "gallop",
    eps: float = 1e-8,
    scope: str = "global",
    seed: int = 0,
    among: Mapping[str, torch.Tensor] | None = None,
    exclude: Mapping[str, torch.Tensor] | None = None,
    backend: str = "auto",
    process_group=None,
) -> Selection:
    """Select exactly round(rho * N) trainable weights of ``model`` by ``criterion`` (rho
    defaults to 0.01), or exactly ``k`` (scope="global" only).

    ``grads`` maps parameter names to gradients (default: each parameter's
    ``.grad``); criteria pafi, magnitude and random need none. Gradients on the
    CPU for parameters on another device (``estimate_gradients(offload=True)``)
    are scored against a host copy of each parameter, with the same result;
    the indices are on each parameter's device either way. ``scope="global"``
    uses one threshold over all weights (the paper), ``"per_tensor"`` takes rho of
    each tensor. Ties go to the earlier parameter, then the lower flat index.

    Restricted selections: ``among`` (a Selection, or name -> sorted int32 or int64 flat
    indices) lets only those weights compete, ``exclude`` keeps those out; N then
    counts the competing weights. With ``among``, a gradient may be given compactly,
    one value per index of among[name]. The result is exactly the unrestricted rule
    applied to the competing weights alone (same scores, same tie rule).

    Across ranks: FSDP2 (DTensor) parameters are selected jointly over their
    mesh, each rank getting the indices of its own shards (``among``/``exclude``
    hold local shard indices); with replicated parameters (DDP) pass
    ``process_group`` to check that every rank selected the same weights. Call it
    on every rank then.
    """
    _validate_args(rho, k, criterion, eps, scope, seed, backend)
    if rho is None and k is None:
        rho = 0.01
    named = _trainable(model)
    among = _checked_restriction("among", among, named, criterion)
    exclude = _checked_restriction("exclude", exclude, named, criterion)
    sources, shard_group, compact = _sources(named, grads, criterion in GRADIENT_CRITERIA, among)
    sources, among, exclude = _on_host_if_needed(sources, among, exclude)
    shard_device = local(named[0][1]).device  # NCCL exchanges on the GPU even when the host scores
    comm = GroupComm(shard_group, shard_device) if shard_group is not None else LocalComm()
    name = _pick_backend(backend, sources, shard_group is not None)
    pool = Pool(sources, among, exclude, compact, comm, dict((n, p.numel()) for n, p in named))
    topk = functools.partial(topk_function(name), criterion=criterion, eps=eps, seed=seed,
                             **({"comm": comm} if name == "reference" else {}))

    def run(ids: list[int]):
        n = pool.count(ids)
        want = k if k is not None else reference.num_to_select(rho, n)
        if want > n:
            restricted = among is not None or exclude is not None
            raise ValueError(f"k={k} but only {n} weights compete" + (" (after among/exclude)" if restricted else ""))
        idx, key = pool.topk(ids, want, topk)
        return idx, (None if key is None else keys.key_to_score(key)), want, n

    if scope == "global":
        idx, threshold, want, n = run(list(range(len(sources))))
        indices = {s.name: i for s, i in zip(sources, idx)}
        rho = rho if rho is not None else (want / n if n else 0.0)
    else:
        indices, threshold = {}, {}
        for i, s in enumerate(sources):
            (indices[s.name],), threshold[s.name], _, _ = run([i])
    home = {n: local(p).device for n, p in named}
    indices = {n: i.to(home[n]) for n, i in indices.items()}  # on the parameter's device, wherever it was scored
    if process_group is not None and shard_group is None:
        check_same_selection(indices, process_group, device=home[sources[0].name])  # NCCL needs the GPU
    shapes = {s.name: s.param.shape for s in sources}
    sel = Selection(indices, shapes, rho=rho, criterion=criterion, scope=scope, threshold=threshold)
    sel.bytes_exchanged = comm.bytes_sent
    return sel
