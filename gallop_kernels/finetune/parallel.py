"""The ``gallop`` command under ``torchrun``: one process group, rank-0 output, evaluation split across ranks.

Under torchrun (``WORLD_SIZE`` > 1) ``finetune`` and ``compare`` join a process group (gloo on
the CPU, NCCL with one GPU per rank). Training is sharded with FSDP2 (:func:`shard`, ``--parallel
fsdp``, the default), data-parallel with DDP (:func:`data_parallel`), or replicated (``none``);
the first two give each rank its rows of every batch (:func:`my_rows`). The evaluation, the
slowest stage, gives each rank every world-th batch of questions and gathers the answers, so the
accuracies are those of one process. Under FSDP2 the model is loaded into its shards
(:func:`load_sharded`) and evaluated sharded, the ranks in lockstep; LoRA's model is loaded whole
and, after training, its adapters are gathered into a plain copy (:func:`unshard_into`) to merge.
Only rank 0 prints and writes the output folder.
Torch is imported only on use, so the command line stays fast.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TypeVar

from ..errors import GallopError

T = TypeVar("T")
TIMEOUT = timedelta(minutes=30)
"""How long a rank waits for the others at a collective before failing instead of hanging."""


def launched() -> bool:
    """Whether this process was started by torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _dist():
    if "torch.distributed" not in sys.modules:  # no process group without it; argument errors stay torch-free
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def backend(gpu: bool = True) -> str:
    """The process group's backend: NCCL when the run uses a GPU (``gpu``) and torch sees one, else gloo
    (``--device cpu`` on a GPU machine trains on the CPU, which NCCL cannot reduce)."""
    import torch

    return "nccl" if gpu and torch.cuda.is_available() else "gloo"


def init(gpu: bool = True) -> None:
    """Join torchrun's process group (NCCL on this rank's GPU, or gloo on the CPU: :func:`backend`); no-op
    outside torchrun."""
    if not launched() or _dist() is not None:
        return
    import torch
    import torch.distributed as dist

    name = backend(gpu)
    if name == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(name, timeout=TIMEOUT)


@contextlib.contextmanager
def joined(wanted: bool = True, gpu: bool = True) -> Iterator[bool]:
    """Under torchrun (and ``wanted``): the process group joined for the block (``gpu``: see :func:`init`),
    and stdout silenced on the ranks other than 0. Yields whether this rank is the one that reports (always
    True in one process)."""
    if not (wanted and launched()):
        yield True
        return
    init(gpu)
    try:
        with contextlib.ExitStack() as quiet:
            if not is_main():
                quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(open(os.devnull, "w"))))
            yield is_main()
    finally:
        close()


def barrier() -> None:
    """Wait until every rank is here (no-op outside a process group)."""
    dist = _dist()
    if dist is not None:
        dist.barrier()


def close() -> None:
    """Leave the process group, if one was joined."""
    dist = _dist()
    if dist is not None:
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def world() -> int:
    """The number of ranks (1 outside a process group)."""
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def is_main() -> bool:
    """Whether this rank prints and writes (rank 0)."""
    return rank() == 0


def mine(n: int) -> list[int]:
    """The items of ``range(n)`` this rank handles: every world-th, from its rank."""
    return list(range(rank(), n, world()))


def merge(part: dict[int, T]) -> dict[int, T]:
    """The union of every rank's ``part`` ({item: result} for the items of :func:`mine`), on every rank."""
    dist = _dist()
    if dist is None:
        return dict(part)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def on_all(action: Callable[[], T]) -> T:
    """Run ``action`` on every rank; when it raises GallopError on any rank, raise the first such
    rank's message on every rank, so that no rank goes on to wait for one that stopped."""
    result, message = None, None
    try:
        result = action()
    except GallopError as e:
        message = str(e) or type(e).__name__
    dist = _dist()
    if dist is not None:
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
        message = next((m for m in messages if m is not None), None)
    if message is not None:
        raise GallopError(message)
    return result


def on_main(action: Callable[[], T]) -> T | None:
    """Run ``action`` on rank 0 only (see :func:`on_all`: its GallopError stops every rank)."""
    return on_all(action if is_main() else lambda: None)


def from_main(action: Callable[[], T]) -> T:
    """``action``'s result on rank 0, sent to every rank (see :func:`on_main`: its GallopError stops every rank)."""
    result = on_main(action)
    dist = _dist()
    if dist is None:
        return result
    box = [result]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def data_parallel(model):
    """``model`` wrapped in DistributedDataParallel for training (on this rank's GPU, or the CPU); the
    model itself, whose parameters DDP shares, stays what optimizers and evaluation use."""
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def my_rows(batch: dict, ignore: int) -> tuple[dict, object]:
    """(this rank's rows of ``batch``, the loss divisor that makes the ranks' gradient average (DDP's
    all-reduce, FSDP2's reduce-scatter) equal the single-process gradient): each rank's loss is its
    sum over the labelled tokens divided by (the whole batch's labelled tokens / world size). The batch has
    a row per rank at least (train.check_split refuses a smaller --batch-size before the run starts)."""
    import torch

    n = world()
    labelled = int((batch["labels"][:, 1:] != ignore).sum())  # the tokens the causal-LM loss counts (labels shift by 1)
    return {k: v[rank()::n] for k, v in batch.items()}, torch.tensor(max(labelled, 1) / n)


def group():
    """The process group of all ranks (None outside one)."""
    dist = _dist()
    return dist.group.WORLD if dist is not None else None


def average(t):
    """The mean of ``t`` over the ranks in float32, on every rank and on ``t``'s device (``t`` itself
    outside a process group). NCCL reduces on this rank's GPU: a host tensor goes there and back."""
    import torch

    dist = _dist()
    if dist is None:
        return t
    where = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = t.detach().to(where, torch.float32, copy=True)
    dist.all_reduce(out)
    return (out / dist.get_world_size()).to(t.device)


def total(n: int) -> int:
    """The sum of ``n`` over the ranks (``n`` itself outside a process group)."""
    dist = _dist()
    if dist is None:
        return n
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, n)
    return sum(parts)


def _base(model):
    """The transformers model inside a peft wrapper (``model`` itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_sharded(model) -> bool:
    """Whether ``model``'s parameters are DTensor shards (FSDP2)."""
    from ..distributed import is_dtensor

    return any(is_dtensor(p) for p in model.parameters())


def decoder_layers(model) -> list:
    """The decoder layers of a Hugging Face ``model`` (the classes its ``_no_split_modules`` names),
    innermost first; GallopError when it names none, since FSDP2 would then gather the whole model."""
    base = _base(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise GallopError(f"--parallel fsdp shards each decoder layer, and {type(base).__name__} names none "
                          f"(no _no_split_modules): use --parallel ddp")
    return layers[::-1]  # modules() lists outer before inner; FSDP2 wraps from the inside out


def shard(model, device_type: str | None = None):
    """``model`` sharded in place with FSDP2 over a 1-D mesh of all ranks: one group per decoder layer,
    the input embedding and the output head one each when they are not tied (tied, they stay in the
    root's group with the rest), then the root. The mesh is on ``device_type`` (default: where the
    parameters are; a model on the meta device must name it). Returns ``model``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    base = _base(model)
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    ends = [] if tied else [m for m in (embed, head) if m is not None]
    mesh = init_device_mesh(device_type or next(model.parameters()).device.type, (world(),))
    for module in [*layers, *ends]:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def load_sharded(path, dtype, device):
    """The causal LM of the checkpoint folder ``path`` in ``dtype``, sharded as :func:`shard` shards it,
    each rank's shards on ``device``: the weights are never whole on one device. The model is built
    with its parameters on the meta device (buffers real, as the model's constructor makes them),
    sharded, and each rank reads only its rows of every tensor from the safetensors files (memory
    mapped), cast to ``dtype`` as ``models.load`` casts them; buffers the checkpoint holds come from it.
    Tied weights stay tied. ModelError, before any weight is read, when the folder has no safetensors
    checkpoint or lacks a parameter or holds it in another shape."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from . import models

    files = models.safetensors_files(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(models.load_config(path), dtype=dtype)
    model.tie_weights()  # init_empty_weights puts a new meta Parameter where the constructor tied one
    with _slices(files) as slices:
        _check_checkpoint(model, slices, path)
        model.generation_config = _generation_config(path, model.generation_config)
        buffers = dict(model.named_buffers())
        saved = {n: slices[n][:] if n in slices else b.clone() for n, b in buffers.items()}
        shard(model, device.type)
        model.to_empty(device=device)  # each rank's shards allocated, not filled; buffers too: refilled below
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(saved[name])
            _fill_shards(model, slices)
    model.eval()
    return model


def _check_checkpoint(model, slices: dict, path) -> None:
    """ModelError unless ``slices`` (:func:`_slices`) holds every parameter of ``model`` in its shape."""
    from .models import ModelError

    for name, p in model.named_parameters():  # tied weights are listed once, under the input embedding's name
        if name not in slices:
            raise ModelError(f"the checkpoint in {str(path)!r} has no tensor {name!r}, a parameter of "
                             f"{type(model).__name__}: --parallel fsdp loads tensors by the model's own names")
        shape = tuple(slices[name].get_shape())
        if shape != tuple(p.shape):
            raise ModelError(f"the checkpoint in {str(path)!r} holds {name!r} in shape {list(shape)}, "
                             f"the model's parameter is {list(p.shape)}")


@contextlib.contextmanager
def _slices(files: dict) -> Iterator[dict]:
    """{tensor name: its safetensors slice} for ``files`` ({tensor name: file}), each file opened once
    (memory mapped): indexing a slice reads only those rows."""
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        opened = {f: stack.enter_context(safe_open(f, framework="pt")) for f in set(files.values())}
        yield {name: opened[f].get_slice(name) for name, f in files.items()}


def _generation_config(path, default):
    """The generation config of the folder ``path`` (as ``from_pretrained`` reads it), else ``default``."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: from_pretrained keeps the one made from the model config
        return default


def _fill_shards(model, slices: dict) -> None:
    """Copy into each of this rank's parameter shards of the FSDP2-sharded ``model`` its rows read from
    ``slices`` (:func:`_slices`), cast to the shard's dtype by ``copy_`` (what ``from_pretrained``'s
    ``to(dtype)`` does)."""
    from ..distributed import dtensor_group, local, shard_starts

    params = list(model.named_parameters())
    starts = shard_starts([p for _, p in params], dtensor_group([p for _, p in params]))
    for (name, p), start in zip(params, starts):
        shard = local(p)
        row = start // (p.numel() // p.shape[0]) if p.shape[0] else 0
        shard.copy_(slices[name][row:row + shard.shape[0]])


def unshard_into(sharded, plain):
    """``plain`` (a model of the same architecture, not sharded) given the full value of every
    parameter of the FSDP2-sharded ``sharded``, on every rank (one all-gather per parameter, in the
    same order on every rank). Returns ``plain``."""
    import torch

    from ..distributed import is_dtensor

    params = dict(plain.named_parameters())
    with torch.no_grad():
        for name, p in sharded.named_parameters():
            params[name].copy_(p.full_tensor() if is_dtensor(p) else p)
    return plain


def full_selection(model, selection, *values: dict) -> tuple[dict, ...]:
    """({name: sorted flat indices into the full parameter, int64}, then per dict of ``values`` {name:
    its values at them}) in host memory, on every rank, from an FSDP2 ``selection`` of each rank's
    shards of ``model`` and ``values`` (per name, one per local index; a name may be missing where a
    rank selected nothing); names nobody selected in are left out, as a one-process selected_values
    leaves them."""
    import torch

    from ..distributed import GroupComm, local, shard_starts

    params = dict(model.named_parameters())
    names = list(selection.keys())
    comm = GroupComm()
    indices, gathered = {}, [{} for _ in values]
    for name, start in zip(names, shard_starts([params[n] for n in names], None)):
        shard = local(params[name])
        idx = comm.all_cat(selection[name].to(device=shard.device, dtype=torch.int64) + start)
        order = torch.argsort(idx)  # the shards lie in rank order: already sorted, kept so by a stable rule
        for into, per_name in zip(gathered, values):
            mine = per_name.get(name, torch.empty(0, dtype=shard.dtype, device=shard.device))
            vals = comm.all_cat(mine.to(shard.device))
            if idx.numel():
                into[name] = vals[order].cpu()  # host: only the delta needs them
        if idx.numel():
            indices[name] = idx[order].cpu()
    return indices, *gathered
