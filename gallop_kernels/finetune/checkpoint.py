"""Mid-run checkpoints of ``gallop finetune`` (``--save-every N``, ``--resume``) with torch.distributed.checkpoint.

Every N training steps every rank writes its part of one DCP checkpoint into a hidden folder
``.checkpoint-<step>.tmp`` of the run's ``--out``; rank 0 adds ``meta.json`` (the step, the losses
so far, the scheduler, the vanilla evaluation, the run's settings, the first selection's count of
weights exactly 0 in the base model), fsyncs it and renames the folder to ``checkpoint-<step>``,
then removes the older ones. A checkpoint is complete exactly when that name exists, so a run
killed while saving leaves the previous one to resume from.

What is saved is what training changes. Sparse methods (SparseAdamW): the selected weights'
values, the optimizer state, the Selection and the base values, each rank under its own key
(:func:`gallop_kernels.distributed.per_rank`: under FSDP2 the indices address a rank's shard);
with re-selection the Reselector's base values and gradient sum in progress instead, as tensors
(this rank's shards), and its step count, history and trained set packed as one item. The rest of
the model is the base model, loaded again on resume; every rank checks its shards' base values. fft and lora/dora: the
trainable parameters (the whole model, the adapters) and the torch optimizer through
``torch.distributed.checkpoint.state_dict`` (plain, DDP's shared and FSDP2's DTensor parameters).
Every rank's random generators are saved too (dropout).

The training code finds the run's :class:`Checkpoints` through :func:`current` (set by
:func:`active` around the job), so its functions keep their signatures: ``train_loop`` resumes
and saves, the sparse path takes a resumed run's selection instead of estimating it again, and
the pipeline reuses the saved vanilla evaluation. Resuming needs the same number of ranks.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from ..delta import selected_values
from ..distributed import is_dtensor, local, per_rank, scatter_, this_rank
from ..errors import GallopError
from ..optim import SparseAdamW
from ..select import Selection
from . import parallel
from .settings import check_same_options

PREFIX = "checkpoint-"
META = "meta.json"
REQUIRED = ("step", "losses", "scheduler", "vanilla", "settings", "save_every", "parts", "selected_zero")
"""The keys of every meta.json (after_step writes them; newest checks them)."""
_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)  # the trainable parameters only
_ACTIVE: ContextVar[Checkpoints | None] = ContextVar("gallop_checkpoints", default=None)


def current() -> Checkpoints | None:
    """The Checkpoints of the run in progress (``gallop finetune --save-every``/``--resume``), else None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def active(checkpoints: Checkpoints | None) -> Iterator[None]:
    """Make ``checkpoints`` the :func:`current` one for the block (None: no checkpoints)."""
    token = _ACTIVE.set(checkpoints)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class Checkpoints:
    """The checkpoints of one ``gallop finetune`` run in ``folder`` (the run's --out, the same path on every rank).

    every: save after every this many steps (and after the last one, when it is a multiple).
    settings: what the run was made with (JSON types), stored so that --resume can refuse other ones.
    saved: the meta.json of the checkpoint to resume from, with "path" added (None: a new run).
    """

    def __init__(self, folder: Path, every: int, settings: dict, saved: dict | None = None, on_saved=None):
        self.folder, self.every, self.settings, self.saved = Path(folder), every, settings, saved
        self.on_saved = on_saved
        """Called on rank 0 after each checkpoint is complete (GrowingFolder.keep: the folder stays)."""
        self.vanilla = saved["vanilla"] if saved else None
        """The vanilla evaluation: a resumed run's, else set by the pipeline once it has run."""
        self.reselector = None
        """The run's Reselector (re-selection: gallop's, SpIEL's), set by the training code; its state is saved."""
        self.base: dict[str, torch.Tensor] | None = None
        """A sparse run's selected weights' values before training, set by the training code (a Reselector
        holds its own)."""
        self._zeros = saved["selected_zero"] if saved else None

    def first_zeros(self, count: int | None) -> int | None:
        """How many weights of the run's first selection are exactly 0 in the base model: a resumed run's saved
        count (its selection may be a later one), else ``count`` (the whole model's), saved with each checkpoint."""
        if self.saved is None:
            self._zeros = count
        return self._zeros

    def selection(self) -> Selection | None:
        """A resumed sparse run's Selection (this rank's), so that the gradient is not estimated again; else None."""
        return None if self.saved is None or "selection" not in self.saved["parts"] else _unpack(
            self._load_bytes("selection"), Selection.from_state_dict)

    def _load_bytes(self, part: str) -> bytes:
        """This rank's bytes saved as ``part`` (a Selection, a Reselector: their sizes are known only once read)."""
        state = {part: per_rank(b"")}
        _dcp(dcp.load, state, self.saved["path"])
        return this_rank(state[part])

    def _covered(self, opt) -> Selection:
        """The weights training changed: a Reselector's trained set (it outlives re-selections), else the selection."""
        return self.reselector.trained if self.reselector is not None else opt.selection

    def _base_values(self) -> dict[str, torch.Tensor]:
        """The covered weights' values before training."""
        return self.reselector.base_values if self.reselector is not None else self.base

    def start(self, model, opt, sched, log=print) -> tuple[int, list[float]]:
        """Before the first step: (steps already made, their losses: rank 0's, which it reports). A resumed
        run's model, optimizer, Reselector, scheduler and random generators are loaded from the checkpoint;
        sparse runs refuse a model whose values at the covered weights differ from the saved base values."""
        if self.saved is None:
            return 0, []
        if self.reselector is not None:
            self._load_reselector(model)
        sparse = isinstance(opt, SparseAdamW)
        if sparse:
            # nothing is trained yet; the Reselector's base values are the loaded ones: read the model's
            here = self.base if self.reselector is None else selected_values(model, self._covered(opt))
            opt.init_state()  # every state tensor in place: the template dcp.load fills
        state = {**self._trainable_state(model, opt), "rng": per_rank(_rng_state())}
        if sparse and self.reselector is None:
            state["base"] = per_rank({n: v.clone() for n, v in here.items()})  # dcp.load fills in place
        _dcp(dcp.load, state, self.saved["path"])
        if sparse:  # every rank compares its own shards: all stop with the first mismatch found
            saved = self._base_values() if self.reselector is not None else this_rank(state["base"])
            parallel.on_all(lambda: _check_base(saved, here, self.folder))
        self._load_trainable(model, opt, state)
        _set_rng_state(this_rank(state["rng"]))
        sched.load_state_dict(self.saved["scheduler"])
        step = self.saved["step"]
        log(f"  resumed from {self.saved['path']} (step {step})")
        return step, list(self.saved["losses"])

    def after_step(self, step: int, model, opt, sched, losses: list[float]) -> None:
        """Save a checkpoint when ``step`` (steps made so far) is a multiple of ``every``."""
        if step % self.every:
            return
        state = {**self._trainable_state(model, opt), "rng": per_rank(_rng_state())}
        if isinstance(opt, SparseAdamW):
            state["selection"] = per_rank(_pack(opt.selection.state_dict()))
        if self.reselector is not None:  # it holds the base values
            small, tensors = _reselector_parts(self.reselector)
            state.update(reselector=per_rank(small), reselector_tensors=per_rank(tensors))
        elif isinstance(opt, SparseAdamW):
            state["base"] = per_rank(self.base)
        tmp = self.folder / f".{PREFIX}{step:07d}.tmp"
        meta = {"step": step, "losses": losses, "scheduler": sched.state_dict(), "vanilla": self.vanilla,
                "settings": self.settings, "save_every": self.every, "parts": sorted(state),
                "selected_zero": self._zeros}
        parallel.on_main(lambda: shutil.rmtree(tmp, ignore_errors=True))  # a killed save's leftovers
        _dcp(dcp.save, state, tmp)  # returns once every rank's part and the metadata are written
        parallel.on_main(lambda: self._publish(tmp, step, meta))

    def release(self) -> None:
        """After training: drop the optimizer's Reselector and the base values (the run's result holds
        what it needs), so that they are not kept through the evaluation."""
        self.reselector = self.base = None

    def _load_reselector(self, model) -> None:
        """Load the Reselector's state: the packed small part first, then the tensors it gives the sizes of."""
        small = _unpack(self._load_bytes("reselector"), dict)
        trained, summing = Selection.from_state_dict(small["trained"]), small.pop("sum")
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        tensors = {f"base.{n}": torch.empty(trained[n].numel(), dtype=p.dtype) for n, p in params.items()}
        if summing:
            tensors.update({f"sum.{n}": torch.empty(local(p).shape) for n, p in params.items()})
        state = {"reselector_tensors": per_rank(tensors)}
        _dcp(dcp.load, state, self.saved["path"])
        tensors = this_rank(state["reselector_tensors"])
        base = {n: tensors[f"base.{n}"] for n in params}
        grad_sum = {n: _like(p, tensors[f"sum.{n}"]) for n, p in params.items()} if summing else None
        self.reselector.load_state_dict({**small, "base": base, "sum": grad_sum})

    def _trainable_state(self, model, opt) -> dict:
        """What training changed (the template to load into, on resume): the covered weights' values and
        SparseAdamW's state per rank, else the trainable parameters and the optimizer (torch's distributed
        state_dict)."""
        if isinstance(opt, SparseAdamW):
            return {"values": per_rank(selected_values(model, self._covered(opt))), "optim": per_rank(opt.state_dict())}
        model_state, optim_state = get_state_dict(model, opt, options=_OPTIONS)
        # torch keeps a frozen weight tied to another (lm_head) under its second name: keep named_parameters' names
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        return {"model": {k: v for k, v in model_state.items() if k in trained}, "optim": optim_state}

    @torch.no_grad()
    def _load_trainable(self, model, opt, state: dict) -> None:
        """Put a loaded :meth:`_trainable_state` into ``model`` and ``opt``."""
        if not isinstance(opt, SparseAdamW):
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=_OPTIONS)
            return
        opt.load_state_dict(this_rank(state["optim"]))
        params, covered = dict(model.named_parameters()), self._covered(opt)
        for name, values in this_rank(state["values"]).items():
            scatter_(params[name].detach(), covered[name].to(values.device), values)

    def _publish(self, tmp: Path, step: int, meta: dict) -> None:
        """Rank 0: meta.json, the rename that makes the checkpoint complete, then the older ones removed.
        The folder is kept (on_saved) before the rename, so that an interruption right after it cannot remove
        the new checkpoint; meta.json and the rename reach the disk before an older checkpoint is removed."""
        final = self.folder / f"{PREFIX}{step:07d}"
        if self.on_saved is not None:
            self.on_saved()
        try:
            _write_synced(tmp / META, json.dumps(meta))
            os.replace(tmp, final)
            _sync(self.folder)
        except OSError as e:
            raise GallopError(f"cannot write the checkpoint {final}: {e.strerror or e}") from None
        for older in complete(self.folder):
            if older != final:
                shutil.rmtree(older, ignore_errors=True)

    def remove(self) -> None:
        """Rank 0, once the run's results are written: remove the checkpoints (and any killed save's leftovers)."""
        for path in [*complete(self.folder), *self.folder.glob(f".{PREFIX}*.tmp")]:
            shutil.rmtree(path, ignore_errors=True)


def complete(folder: Path) -> list[Path]:
    """The complete checkpoints in ``folder``, oldest first."""
    return sorted(p for p in folder.glob(f"{PREFIX}*") if (p / META).is_file())


def newest(folder: Path, settings: dict) -> dict:
    """meta.json of the newest complete checkpoint in ``folder`` (with "path"), after checking that it was made
    with ``settings``; GallopError in one line when there is none or the settings differ."""
    found = complete(folder)
    if not found:
        raise GallopError(f"--resume: {folder} holds no complete checkpoint (a run started with --save-every "
                          f"writes them; a finished run removes them)")
    try:
        meta = json.loads((found[-1] / META).read_text())
        missing = [k for k in REQUIRED if k not in meta]
        made_with = dict(meta["settings"]) if not missing else {}
    except (OSError, ValueError, TypeError) as e:
        raise GallopError(f"--resume: cannot read {found[-1] / META} ({type(e).__name__}: {e})") from None
    if missing:
        raise GallopError(f"--resume: {found[-1] / META} is damaged: it lacks {', '.join(missing)}")
    check_same_options(folder, made_with, settings)
    return {**meta, "path": str(found[-1])}


def _write_synced(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and flush it to the disk."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sync(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename in it) to the disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dcp(action, state: dict, path) -> None:
    """dcp.save or dcp.load of ``state`` at ``path``, without its warning that one process saves alone."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        action(state, checkpoint_id=path)


def _pack(state: dict) -> bytes:
    """``state`` (tensors, numbers, strings) as bytes: DCP stores them as one item, whatever their sizes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _unpack(data: bytes, make):
    """``make`` of what :func:`_pack` stored."""
    return make(torch.load(io.BytesIO(data), weights_only=True))


def _reselector_parts(reselector) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A Reselector's state as its small part packed (step count, history, trained set) and its tensors, filed
    as DCP entries: the base values and the gradient sum in progress (this rank's shards, on the CPU)."""
    state = reselector.state_dict()
    base, grad_sum = state.pop("base"), state.pop("sum")
    tensors = {f"base.{n}": v for n, v in base.items()}
    if grad_sum is not None:
        tensors.update({f"sum.{n}": local(t) for n, t in grad_sum.items()})
    return _pack({**state, "sum": grad_sum is not None}), tensors


def _like(param: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` (a parameter's local shard) as ``param`` is: a DTensor sharded the same way, else itself."""
    if not is_dtensor(param):
        return values
    return DTensor.from_local(values.to(local(param).device), param.device_mesh, param.placements,
                              shape=param.shape, stride=param.stride(), run_check=False)


def _rng_state() -> dict[str, torch.Tensor]:
    """This rank's random generators (CPU, and its current GPU): dropout draws from them."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`_rng_state` saved."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _check_base(saved: dict, here: dict, folder: Path) -> None:
    """GallopError unless the model loaded now has the saved base values at the selected weights, bit for bit."""
    for name, values in here.items():
        if not torch.equal(saved[name].view(torch.uint8), values.view(torch.uint8)):
            raise GallopError(f"--resume: the model's weight {name} differs from the one the run in {folder} "
                              f"started from; give the same --model")
