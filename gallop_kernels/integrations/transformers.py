"""GaLLoP in 🤗 Trainer and TRL: ``GallopConfig``, ``GallopTrainer`` and ``gallop_trainer(AnyTrainer)``.

::

    from gallop_kernels.integrations.transformers import GallopConfig, GallopTrainer, gallop_trainer

    trainer = GallopTrainer(model=model, args=args, train_dataset=ds, gallop_config=GallopConfig(rho=0.01))
    trainer.train()            # estimate g on the first batches, select rho of the weights, train them
    trainer.save_model("out")  # out/delta.safetensors, for `gallop apply --base BASE --delta out/delta.safetensors`

    GallopSFTTrainer = gallop_trainer(trl.SFTTrainer)  # any Trainer subclass, as PEFT-SFT's SftTrainer(MyTrainer)

The trainer keeps everything else: its data collator, device placement, mixed precision,
gradient accumulation and checkpointing, scheduler, clipping and logging. Supported: one process
(CPU or one GPU). Not yet: DeepSpeed, FSDP and several processes or GPUs (each rank would
estimate its own gradient and select other weights); the constructor refuses them.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from dataclasses import dataclass
from functools import partial

import torch

try:
    import transformers
    from transformers.trainer_utils import get_last_checkpoint, has_length
except ImportError as e:  # the library itself needs neither; say what to install in one line
    raise ModuleNotFoundError("gallop_kernels.integrations.transformers needs transformers and accelerate: "
                              "pip install 'transformers>=4.46' 'accelerate>=1.0'", name=e.name) from None

from ..criteria import GRADIENT_CRITERIA
from ..delta import make_delta, save_delta, selected_values
from ..estimate import GRAD_FRACTION, estimate_gradients, model_device
from ..optim import SparseAdamW
from ..select import Selection, _validate_args, select_mask

logger = logging.getLogger(__name__)

SELECTION_FILE = "gallop_selection.pt"  # in every checkpoint folder: the Selection and the base values
DELTA_FILE = "delta.safetensors"  # what save_model writes


@dataclass
class GallopConfig:
    """What GallopTrainer selects and how SparseAdamW trains it.

    The learning rate, betas, eps and weight decay come from the trainer's TrainingArguments.

    - ``rho`` (float, default 0.01): share of the trainable weights trained, in (0, 1].
    - ``criterion`` (default "gallop", |g| / (|theta| + eps)), ``eps``, ``scope``: as :func:`select_mask`.
    - ``grad_batches`` (int >= 1) or ``grad_fraction`` (in (0, 1]): estimate g on that many (that
      share, rounded up) of the first batches of the train dataloader, at most one epoch. Neither:
      ``grad_fraction=0.25``, the ``gallop`` command's default d_s.
    - ``accum_dtype`` (torch dtype or None): sum the estimate in that dtype; None: in ``.grad``.
    - ``compact_grads``, ``master_weights``: :class:`SparseAdamW` options.
    - ``save_merged`` (bool): ``save_model`` also writes the merged model (the trainer's own save).
    """

    rho: float = 0.01
    criterion: str = "gallop"
    eps: float = 1e-8
    scope: str = "global"
    grad_batches: int | None = None
    grad_fraction: float | None = None
    accum_dtype: torch.dtype | None = None
    compact_grads: bool = False
    master_weights: bool | None = None
    save_merged: bool = False

    def __post_init__(self):
        try:
            _validate_args(self.rho, None, self.criterion, self.eps, self.scope, 0, "auto")
        except ValueError as e:  # select_mask's checks, named for this class
            raise ValueError(f"GallopConfig: {e}") from None
        if self.grad_batches is not None and self.grad_fraction is not None:
            raise ValueError("GallopConfig: set grad_batches or grad_fraction, not both")
        batches, fraction, dtype = self.grad_batches, self.grad_fraction, self.accum_dtype
        if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
            raise ValueError(f"GallopConfig: grad_batches must be an integer >= 1, got {batches!r}")
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                     or not 0 < fraction <= 1):
            raise ValueError(f"GallopConfig: grad_fraction must be a number in (0, 1], got {fraction!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"GallopConfig: accum_dtype must be None or a floating torch dtype, got {dtype!r}")
        for name in ("compact_grads", "save_merged"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GallopConfig: {name} must be True or False, got {getattr(self, name)!r}")
        if self.master_weights not in (None, True, False):
            raise ValueError(f"GallopConfig: master_weights must be None, True or False, got {self.master_weights!r}")


def _check_trainer_inputs(args, kwargs: dict) -> None:
    """ValueError, before the trainer is built, for what GallopTrainer cannot do."""
    for key in ("optimizers", "optimizer_cls_and_kwargs"):
        if kwargs.get(key) not in (None, (None, None)):
            raise ValueError(f"GallopTrainer builds its own SparseAdamW over the selection: do not pass {key}= "
                             "(learning rate, betas, eps and weight decay come from TrainingArguments)")
    if args is None:
        return
    optim = getattr(args.optim, "value", args.optim)
    if not str(optim).startswith("adamw"):
        raise ValueError(f"GallopTrainer trains with SparseAdamW (AdamW on the selected weights): "
                         f"TrainingArguments.optim={optim!r} is another optimizer; leave it at adamw_torch")
    if args.deepspeed:
        raise ValueError("GallopTrainer does not support DeepSpeed yet (TrainingArguments.deepspeed): ZeRO would "
                         "replace SparseAdamW by its own optimizer")
    if args.fsdp:
        raise ValueError("GallopTrainer does not support FSDP yet (TrainingArguments.fsdp): use select_mask and "
                         "SparseAdamW with FSDP2 directly (README, 'Across GPUs: DDP and FSDP2')")
    if args.world_size > 1 or args.n_gpu > 1:
        raise ValueError(f"GallopTrainer does not support several processes or GPUs yet (world_size "
                         f"{args.world_size}, n_gpu {args.n_gpu}): each would estimate its own gradient and select "
                         f"other weights")


def _cuda_devices(model: torch.nn.Module) -> list[int]:
    """The CUDA device indices of the model's parameters (the RNGs the estimate must leave as they were)."""
    return sorted({p.device.index for p in model.parameters() if p.is_cuda})


def _load_selection(folder: str) -> tuple[Selection, dict[str, torch.Tensor]]:
    """(Selection, base values) saved in a checkpoint folder by GallopTrainer."""
    path = os.path.join(folder, SELECTION_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {folder} has no {SELECTION_FILE}: GallopTrainer resumes only from "
                                f"checkpoints a GallopTrainer wrote")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return Selection.from_state_dict(saved["selection"]), saved["base_values"]


class GallopMixin:
    """Makes a ``transformers.Trainer`` subclass train with GaLLoP (see the module docstring).

    Adds the keyword ``gallop_config`` (a :class:`GallopConfig`, default ``GallopConfig()``).
    After ``train()``, ``trainer.gallop_selection`` is the Selection and ``trainer.gallop_stats``
    what was also logged: ``gallop/selected``, ``gallop/total``, ``gallop/estimate_seconds``,
    ``gallop/select_seconds``, ``gallop/grad_batches`` and ``gallop/optimizer_state_bytes``.
    """

    def __init__(self, *args, gallop_config: GallopConfig | None = None, **kwargs):
        config = GallopConfig() if gallop_config is None else gallop_config
        if not isinstance(config, GallopConfig):
            raise TypeError(f"gallop_config must be a GallopConfig, got {type(config).__name__}")
        _check_trainer_inputs(args[1] if len(args) > 1 else kwargs.get("args"), kwargs)
        super().__init__(*args, **kwargs)
        if config.grad_batches is None and self.train_dataset is not None and not has_length(self.train_dataset):
            raise ValueError("GallopConfig: grad_fraction needs a train dataset with a length; set grad_batches")
        self.gallop_config = config
        self.gallop_selection: Selection | None = None
        self.gallop_stats: dict = {}
        self._gallop_base: dict[str, torch.Tensor] | None = None  # selected values before training: the delta's base
        self._gallop_resumed: tuple | None = None  # set by train(resume_from_checkpoint=...)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; resuming restores the checkpoint's selection instead of estimating a new one."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # True: the trainer's error
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            self._gallop_resumed = _load_selection(str(resume_from_checkpoint))
            self.optimizer = None  # rebuilt over the checkpoint's selection, then loads its state
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_optimizer(self, model=None):
        """SparseAdamW over the selection (made now, or restored from the checkpoint being resumed)."""
        if self.optimizer is None:
            model = self.model if model is None else model
            if self._gallop_resumed is None:
                self._gallop_select(model)
            else:
                self._gallop_restore(model)
            self.optimizer = self._gallop_optimizer(model)
            self.log(dict(self.gallop_stats))
        return self.optimizer

    def _gallop_select(self, model) -> None:
        """Estimate g on the first train batches (criteria that need it), select, keep the base values."""
        cfg = self.gallop_config
        t0 = time.perf_counter()
        grads, n = None, 0
        if cfg.criterion in GRADIENT_CRITERIA:
            loader = self.get_train_dataloader()
            n = cfg.grad_batches or math.ceil((cfg.grad_fraction or GRAD_FRACTION) * len(loader))
            n = min(n, len(loader)) if has_length(loader) else n
            # A fresh train dataloader gives the training's first batches (its sampler is seeded, or draws from the
            # RNG state that fork_rng restores afterwards), so the estimate leaves data order and dropout as they were.
            with torch.random.fork_rng(devices=_cuda_devices(model)):
                grads = estimate_gradients(model, itertools.islice(loader, n), loss=partial(self._gallop_loss, model),
                                           accum_dtype=cfg.accum_dtype)
        t1 = time.perf_counter()
        sel = select_mask(model, grads, rho=cfg.rho, criterion=cfg.criterion, eps=cfg.eps, scope=cfg.scope,
                          seed=self.args.seed)
        del grads
        self.gallop_selection, self._gallop_base = sel, selected_values(model, sel)
        self.gallop_stats = {"gallop/grad_batches": n, "gallop/estimate_seconds": t1 - t0,
                             "gallop/select_seconds": time.perf_counter() - t1}

    def _gallop_loss(self, model, batch) -> torch.Tensor:
        """The trainer's loss of one batch, as its training step computes it (device, autocast, compute_loss)."""
        model.train()  # as training_step does: dropout, and HF models checkpoint activations in train mode only
        inputs = self._prepare_inputs(batch)
        # The model is not prepared by accelerate yet, so its mixed-precision autocast is entered here.
        with self.accelerator.autocast(), self.compute_loss_context_manager():
            return self.compute_loss(model, inputs)

    def _gallop_restore(self, model) -> None:
        """Take the selection and base values loaded by train(resume_from_checkpoint=...)."""
        sel, base = self._gallop_resumed
        self._gallop_resumed = None
        device = model_device(model)
        self.gallop_selection = sel.to(device)
        self._gallop_base = {n: t.to(device) for n, t in base.items()}
        self.gallop_stats = {}

    def _gallop_optimizer(self, model) -> SparseAdamW:
        """SparseAdamW with the trainer's lr, betas, eps, and weight decay on its decay parameters only."""
        args, cfg = self.args, self.gallop_config
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [(n, p) for n, p in named if n in decay], "weight_decay": args.weight_decay},
                  {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0}]
        opt = SparseAdamW([g for g in groups if g["params"]], selection=self.gallop_selection, lr=args.learning_rate,
                          betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                          master_weights=cfg.master_weights, compact_grads=cfg.compact_grads)
        opt.init_state()  # now rather than at the first step, so its size can be logged
        sel = self.gallop_selection
        self.gallop_stats.update({
            "gallop/selected": sel.num_selected, "gallop/total": sel.num_total,
            "gallop/optimizer_state_bytes": sum(t.numel() * t.element_size() for s in opt.state.values()
                                                for t in s.values() if torch.is_tensor(t)),
        })
        logger.info("GaLLoP: %s", self.gallop_stats)
        return opt

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Called by you: write the sparse delta ``delta.safetensors`` to ``output_dir`` (``gallop apply`` adds it to
        the base model bit for bit), and with ``GallopConfig(save_merged=True)`` the merged model too.

        Called by the trainer for a checkpoint (``_internal_call``): its full save, plus the selection and
        base values (``gallop_selection.pt``), so ``train(resume_from_checkpoint=...)`` continues the same run.
        """
        output_dir = self.args.output_dir if output_dir is None else output_dir
        if _internal_call:
            super().save_model(output_dir, _internal_call=True)
            if self.gallop_selection is not None and self.args.should_save:
                base = {n: t.cpu() for n, t in self._gallop_base.items()}
                torch.save({"selection": self.gallop_selection.state_dict(), "base_values": base},
                           os.path.join(output_dir, SELECTION_FILE))
            return
        if self.gallop_selection is None:
            raise RuntimeError("GallopTrainer.save_model writes the delta of a training run: call train() first")
        if self.gallop_config.save_merged:
            super().save_model(output_dir)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            save_delta(os.path.join(output_dir, DELTA_FILE),
                       make_delta(self.model, self.gallop_selection, self._gallop_base, self._gallop_info()))

    def _gallop_info(self) -> dict:
        """The delta's ``info``: what ``gallop apply`` prints and its ``--dtype auto`` reads."""
        cfg, model = self.gallop_config, self.model
        base = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        return {"base": base, "task": os.path.basename(os.path.abspath(self.args.output_dir)),
                "criterion": cfg.criterion, "rho": cfg.rho, "eps": cfg.eps, "scope": cfg.scope, "seed": self.args.seed,
                "steps": self.state.global_step, "trainer": type(self).__name__,
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


class GallopTrainer(GallopMixin, transformers.Trainer):
    """``transformers.Trainer`` that trains with GaLLoP: ``GallopTrainer(model=..., args=..., train_dataset=...,
    gallop_config=GallopConfig(...))``; see :class:`GallopMixin`."""


def gallop_trainer(trainer_cls: type) -> type:
    """``trainer_cls`` (``transformers.Trainer`` or a subclass, e.g. ``trl.SFTTrainer``) made to train with GaLLoP:
    the class ``Gallop<Name>``, which takes ``gallop_config=GallopConfig(...)`` besides its own arguments."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, transformers.Trainer)):
        raise TypeError(f"gallop_trainer needs a transformers.Trainer subclass, got {trainer_cls!r}")
    if issubclass(trainer_cls, GallopMixin):
        return trainer_cls
    doc = f"{trainer_cls.__name__} that trains with GaLLoP; see GallopMixin."
    return type(f"Gallop{trainer_cls.__name__}", (GallopMixin, trainer_cls), {"__doc__": doc, "__module__": __name__})
