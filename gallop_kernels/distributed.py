"""GaLLoP across ranks with torch.distributed: DDP (replicated) and FSDP2 (DTensor shards).

Under FSDP2 each rank scores only its local shards; the selection needs one
all-reduce of the 2**16-bin histogram (512 KiB) and one all-gather of the
boundary bin's few candidates, whatever the model size. Each rank keeps the
flat indices of its own shards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

try:  # DTensor is public from torch 2.5
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = Shard = None


def is_dtensor(t: torch.Tensor) -> bool:
    """True for a DTensor (an FSDP2 parameter or gradient)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's part of ``t``: the local shard of a DTensor, else ``t`` itself."""
    return t.to_local() if t is not None and is_dtensor(t) else t


INT32_LIMIT = 2**31  # a tensor with this many weights or more needs int64 flat indices


def index_dtype(numel: int) -> torch.dtype:
    """The dtype of flat indices into a tensor of ``numel`` weights: int32 below 2^31
    weights (half the memory of int64), else int64."""
    return torch.int32 if numel < INT32_LIMIT else torch.int64


def gather(t: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """t.reshape(-1)[indices], a new tensor; a DTensor's indices address its local shard."""
    return local(t).reshape(-1)[indices]


def scatter_(t: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    """t.reshape(-1)[indices] = values, in place, also for non-contiguous t and DTensor shards
    (int32 or int64 indices)."""
    t = local(t)
    if t.is_contiguous():
        t.view(-1)[indices] = values.to(t.dtype)
    else:
        t[torch.unravel_index(indices.long(), t.shape)] = values.to(t.dtype)


class GroupComm:
    """Collectives over a process group, counting the bytes this rank sends.

    ``device``: where the collectives run (default: each tensor's own device). A selection
    scored on the host for CUDA shards (offloaded estimation under FSDP2) passes the shards'
    device, since NCCL has no CPU collectives; results come back on the tensor's device.
    """

    def __init__(self, group=None, device: torch.device | None = None):
        self.group = group
        self.device = device
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bytes_sent = 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks."""
        out = t.to(self.device or t.device, copy=True)
        self.bytes_sent += out.numel() * out.element_size()
        dist.all_reduce(out, group=self.group)
        return out.to(t.device)

    def all_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation of every rank's 1-D ``t`` (lengths may differ), in rank order."""
        dev = self.device or t.device
        n = torch.tensor([t.numel()], dtype=torch.int64, device=dev)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n, group=self.group)
        sizes = [int(s) for s in sizes]
        padded = torch.zeros(max(sizes), dtype=t.dtype, device=dev)
        padded[: t.numel()] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self.bytes_sent += (n.numel() * n.element_size() + padded.numel() * padded.element_size())
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)


def dtensor_group(params: list[torch.Tensor]):
    """The process group of the DTensor parameters, or None when there are none.

    Supports FSDP2's layout: a 1-D mesh and Shard(0) placements. Mixing DTensor
    and regular parameters is refused, since the regular ones would be counted
    once per rank.
    """
    dt = [p for p in params if is_dtensor(p)]
    if not dt:
        return None
    if len(dt) != len(params):
        raise ValueError("select_mask: the model mixes DTensor (FSDP2) and regular parameters; shard all of them")
    mesh = dt[0].device_mesh
    for p in dt:
        if p.device_mesh != mesh or p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(
                f"select_mask supports DTensor parameters on one 1-D mesh with Shard(0) placement "
                f"(FSDP2's default); got mesh {p.device_mesh} placements {p.placements}"
            )
    return mesh.get_group()


def shard_starts(params: list[torch.Tensor], group) -> list[int]:
    """Flat index, within the full parameter, of each local shard's first element.

    Gathers every rank's local row counts once, so uneven shards need no
    assumption about how FSDP2 splits rows.
    """
    dev = local(params[0]).device  # NCCL gathers device tensors, gloo CPU ones
    rows = torch.tensor([local(p).shape[0] if p.dim() else local(p).numel() for p in params], dtype=torch.int64, device=dev)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    every = [torch.zeros_like(rows) for _ in range(world)]
    dist.all_gather(every, rows, group=group)
    rows_before = torch.stack(every[:rank]).sum(0).cpu() if rank else torch.zeros_like(rows).cpu()
    starts = []
    for p, r in zip(params, rows_before.tolist()):
        row_numel = p.numel() // p.shape[0] if p.dim() and p.shape[0] else 1
        starts.append(r * row_numel)
    return starts


def check_same_selection(indices: dict[str, torch.Tensor], group=None, device=None) -> None:
    """Raise ValueError unless every rank holds the same selection (DDP).

    Compares a per-parameter fingerprint (count and index sums) across ranks.
    """
    finger = torch.tensor(
        [v for i in indices.values() for v in (i.numel(), int(i.sum()), int((i * i % 1_000_003).sum()))],
        dtype=torch.int64,
        device=device,
    )
    comm = GroupComm(group)
    every = comm.all_cat(finger).view(comm.world, -1)
    if not bool((every == every[0]).all()):
        raise ValueError(
            "ranks selected different weights: the gradients differ between ranks "
            "(under DDP, pass gradients after the all-reduce, i.e. after backward)"
        )


def _rank_key(group) -> str:
    """"rank<r>" for this rank of ``group``; "rank0" when no process group is initialized."""
    return f"rank{dist.get_rank(group) if dist.is_initialized() else 0}"


def per_rank(state_dict: dict, group=None) -> dict:
    """``{"rank<r>": state_dict}``: one rank's own state for torch.distributed.checkpoint.

    DCP writes a regular tensor stored under the same key on every rank once, as
    if it were replicated; SparseAdamW's compact states and a Selection's indices
    differ per rank under FSDP2, so each rank files them under its own key.
    Restore with :func:`this_rank` at the same world size. For the optimizer, call
    ``opt.init_state()`` on the fresh optimizer first, so that its state_dict is
    a complete template for ``dcp.load``. Without a process group (one process)
    the state is rank 0's, so the same code saves and loads in both cases.
    """
    return {_rank_key(group): state_dict}


def this_rank(per_rank_state: dict, group=None) -> dict:
    """This rank's entry of a :func:`per_rank` dict."""
    key = _rank_key(group)
    if key not in per_rank_state:
        raise ValueError(f"no state saved for {key}: the checkpoint holds {sorted(per_rank_state)}")
    return per_rank_state[key]
