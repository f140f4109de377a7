"""Memory planner: the bytes full fine-tuning, LoRA and GaLLoP hold on a Hugging Face config.

Per method: weights, gradients, optimizer state, master weights, index lists,
the gradients held while the selection's mean gradient is estimated, and (given
a batch shape) an estimate of the activations, as the ``gallop`` command trains
them. ``gallop plan`` prints it for any model; ``python -m gallop_kernels.memory``
prints the paper's two models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .distributed import index_dtype
from .markdown import table
from .reference import num_to_select

# The DoRA / LLM-Adapters commonsense recipe adapts these projections; the trainer uses the same list.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
STATE_BYTES = 4  # fp32 exp_avg / exp_avg_sq / master / gradient-buffer entries


def preset_config(name: str):
    """Configs of the paper's models, built from their published shapes."""
    from transformers import GemmaConfig, LlamaConfig

    if name == "llama3-8b":
        return LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=False,
        )  # fmt: skip
    if name == "gemma-2b":
        return GemmaConfig(
            vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
            num_attention_heads=8, num_key_value_heads=1, head_dim=256, tie_word_embeddings=True,
        )  # fmt: skip
    raise ValueError(f"unknown preset {name!r}; expected 'llama3-8b' or 'gemma-2b'")


@dataclass(frozen=True)
class _Layout:
    """A causal LM's trainable parameter shapes and the FSDP2 groups the ``gallop`` command wraps them in."""

    shapes: dict[str, torch.Size]
    root: tuple[str, ...]
    """The root group: the final norm and whatever else is outside the other groups (tied embeddings too)."""
    groups: tuple[tuple[str, ...], ...]
    """The other groups in forward order: the input embedding (untied), one per decoder layer, the head (untied)."""


_LAYOUTS: dict[str, _Layout] = {}  # config JSON -> layout: a planner asks again per batch size


def _layout(config) -> _Layout:
    """The :class:`_Layout` of the causal LM ``config`` describes (built on the meta device, no memory)."""
    from transformers import AutoModelForCausalLM

    key = config.to_json_string()
    if key not in _LAYOUTS:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        names = {id(p): n for n, p in model.named_parameters()}  # tied weights are listed once
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = head is not None and head.weight is embed.weight
        own = lambda module: tuple(names[id(p)] for p in module.parameters())  # noqa: E731
        layers: dict[int, list[str]] = {}
        for n in names.values():
            if _layer_of(n) is not None:
                layers.setdefault(_layer_of(n), []).append(n)
        groups = [tuple(layers[i]) for i in sorted(layers)]
        if not tied:
            groups = [own(embed), *groups] + ([own(head)] if head is not None else [])
        grouped = {n for g in groups for n in g}
        shapes = {n: p.shape for n, p in model.named_parameters()}
        _LAYOUTS[key] = _Layout(shapes, tuple(n for n in shapes if n not in grouped), tuple(groups))
    return _LAYOUTS[key]


def _shapes(config) -> dict[str, torch.Size]:
    """Trainable parameter shapes of the causal LM ``config`` describes (meta device, no memory)."""
    return _layout(config).shapes


def activation_bytes(config, batch_size: int, seq_len: int, dtype: torch.dtype = torch.bfloat16,
                     gradient_checkpointing: bool = False) -> int:
    """Estimated bytes of the activations one training step keeps for backward (an estimate, not a bound).

    Per token and layer a Llama-style block keeps the inputs of its norms,
    projections and attention (7 hidden-size vectors, q/k/v counted once, k and v
    at their grouped size) and of its gated MLP (4 intermediate-size vectors);
    attention is assumed memory-efficient (SDPA / flash: no seq x seq matrix);
    a config without ``intermediate_size`` counts 4 x hidden.
    The loss keeps the logits in ``dtype`` and twice in float32 (upcast and
    log-softmax). With gradient checkpointing a layer keeps only its input, and
    one layer's activations exist at a time while it is recomputed.
    """
    b = torch.empty((), dtype=dtype).element_size()
    h, layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h  # GPT-2: n_inner
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = 2 * getattr(config, "num_key_value_heads", config.num_attention_heads) * head_dim
    tokens = batch_size * seq_len
    layer = tokens * (7 * h + kv + 4 * inter) * b
    blocks = layers * tokens * h * b + layer if gradient_checkpointing else layers * layer
    logits = tokens * config.vocab_size * (b + 2 * STATE_BYTES)
    return blocks + logits


@dataclass
class MemoryRow:
    """Bytes held by one method on one device in each phase of a run; ``peak`` = the largest phase's
    (:attr:`phases`): weights + activations + estimation, weights + activations + training, evaluation,
    gathering."""

    method: str
    trainable: int
    weights: int
    gradients: int
    optimizer_state: int
    master_weights: int
    index_lists: int
    estimation: int = 0
    """Gradients held on the device while the mean gradient of the selection is estimated (sparse methods)."""
    activations: int = 0
    host_estimation: int = 0
    """Host memory of offloaded estimation: the gradient sums, theta's copy for selection, a staging buffer."""
    reselection: int = 0
    """What a Reselector keeps during training (re-selecting methods): its float32 gradient sum and the
    trained weights' base values (and, for GaLLoP re-selection, the trained set's indices)."""
    evaluation: int = 0
    """Loading and evaluating the model (the vanilla and the tuned one): the whole model on the device, or
    under FSDP2 the sharded model's ``weights`` (LoRA: the whole merged model); after a sparse method the
    selection and values its report keeps. Evaluation activations are left out."""
    gathering: int = 0
    """LoRA under FSDP2 only: the adapters gathered into a reloaded whole copy while the shards, the
    sharded adapters' state and one all-gathered tensor still exist."""

    @property
    def training(self) -> int:
        """Bytes besides the weights and activations during a training step."""
        return self.gradients + self.optimizer_state + self.master_weights + self.index_lists + self.reselection

    @property
    def phases(self) -> dict[str, int]:
        """{phase: bytes held on the device at its peak}, in the order the run goes through them
        (evaluation: of the vanilla model before training, of the tuned one after)."""
        held = self.weights + self.activations
        return {"estimation": held + self.estimation, "training": held + self.training,
                "gathering": self.gathering, "evaluation": self.evaluation}

    @property
    def peak(self) -> int:
        """The most bytes the device holds at once: the largest of :attr:`phases`."""
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        """The phase that holds :attr:`peak` (training over estimation on a tie: both hold it)."""
        phases = self.phases
        return max(("training", "estimation", "gathering", "evaluation"), key=phases.__getitem__)


def lora_activation_bytes(config, batch_size: int, seq_len: int, lora_rank: int, dtype: torch.dtype,
                          gradient_checkpointing: bool = False, lora_targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """What peft's float32 adapters keep for backward beyond :func:`activation_bytes`: each adapter's
    rank-r output, and on a narrower ``dtype`` each adapted projection's input cast to float32 (one copy
    per adapter: q, k and v cast the same input three times). One layer's worth with checkpointing."""
    shapes = _shapes(config)
    narrow = torch.empty((), dtype=dtype).element_size() < STATE_BYTES
    adapted = [s for name, s in shapes.items() if len(s) == 2 and name.split(".")[-2] in lora_targets]
    per_token = sum(lora_rank + (s[1] if narrow else 0) for s in adapted) * STATE_BYTES
    layers = config.num_hidden_layers
    return batch_size * seq_len * per_token // (layers if gradient_checkpointing else 1)


def _layer_of(name: str) -> int | None:
    """The decoder layer index in a parameter name (``model.layers.3.mlp...`` -> 3); None outside the layers."""
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "h", "blocks") and b.isdigit():
            return int(b)
    return None


@dataclass(frozen=True)
class _Fsdp:
    """Numbers of weights one rank holds under FSDP2 with the command's wrapping (see :func:`_fsdp`)."""

    shard: int
    """This rank's shard of every parameter (dim 0 split, padded up to a multiple of the world size)."""
    gathered: int
    """The most all-gathered weights at once (the root, and a group being copied out of its all-gather buffer)."""
    grads: int
    """What unsharded gradients and reduce-scatter buffers add to ``gathered`` at backward's peak."""
    grads_freed: int
    """``grads`` when post-accumulate-grad hooks take each group's sharded gradient off the device (offloaded
    estimation, compact gradients): a reduce-scatter's output shard is then held until its hooks ran."""
    largest_shard: int
    """The largest tensor's shard (the host copier's staging buffer)."""


def _fsdp(layout: _Layout, world_size: int) -> _Fsdp:
    """What FSDP2 ``fully_shard`` (torch 2.13) allocates per rank for the groups of ``layout``.

    Read from torch/distributed/fsdp/_fully_shard: every non-root group is gathered before it runs
    and resharded after (forward and backward); the root stays gathered the whole step. An
    all-gather's flat output and the group's unsharded parameters coexist during the copy-out
    (2x the group); backward prefetches the next group while one runs. Each group's unsharded
    gradients are copied into a reduce-scatter input (2x the group) and freed; that input is held
    until the next group's reduce-scatter. The root's gradients are reduced last, at the end of
    backward. One process (``world_size`` 1) shards nothing and gathers nothing.
    """
    shapes = layout.shapes
    rows = lambda s: -(-s[0] // world_size) if len(s) else 1  # noqa: E731  (rows of a shard; a scalar: 1)
    per_row = lambda s: s.numel() // s[0] if len(s) and s[0] else s.numel()  # noqa: E731
    shard = {n: rows(s) * per_row(s) for n, s in shapes.items()}
    largest = max(shard.values())
    if world_size == 1:
        return _Fsdp(sum(shard.values()), 0, 0, 0, largest)
    padded = lambda names: world_size * sum(shard[n] for n in names)  # noqa: E731  (all-gathered, padded)
    numel = lambda names: sum(shapes[n].numel() for n in names)  # noqa: E731
    root, root_grads = padded(layout.root), numel(layout.root)
    gathered = max(2 * root, root + 2 * max((padded(g) for g in layout.groups), default=0))

    def backward(out_held: bool) -> int:
        """The most weights, gradients and reduce-scatter buffers alive at once in backward."""
        order = [(padded(g), numel(g)) for g in reversed(layout.groups)]
        peak = root + (root // world_size if out_held else 0)  # the root's reduce-scatter, last: its input buffer
        for i, (p, g) in enumerate(order):
            before = order[i - 1][0] if i else 0  # the previous group's reduce-scatter input, held until this one's
            after = order[i + 1][0] if i + 1 < len(order) else 0  # prefetched
            out = p // world_size if out_held else 0
            peak = max(peak, 2 * p + before,  # the copy-out of this group's all-gather
                       p + after + before + g,  # its backward: its gradients produced
                       after + g + p + out)  # its reduce-scatter: gradients copied into the input, then freed
        return root + root_grads + peak

    plain, hooked = backward(False), backward(True)
    return _Fsdp(sum(shard.values()), gathered, plain - gathered, hooked - gathered, largest)


def memory_plan(
    config,
    rho: float = 0.01,
    lora_rank: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    lora_targets: tuple[str, ...] = LORA_TARGETS,
    *,
    grad_accum_dtype: torch.dtype | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    gradient_checkpointing: bool = False,
    offload_grads: bool = False,
    world_size: int = 1,
    reselect: str | None = None,
) -> list[MemoryRow]:
    """Rows for full fine-tuning (AdamW), LoRA at ``lora_rank`` and GaLLoP at ``rho``
    (dense and compact gradients), with the weights in ``dtype``, as the ``gallop`` command trains them,
    in bytes per device.

    - Full fine-tuning: ``torch.optim.AdamW`` on the weights as they are, so
      gradients and ``exp_avg`` / ``exp_avg_sq`` are in ``dtype`` (pure bf16
      training, no master copy).
    - LoRA: peft's adapters in float32 (peft's default casts them up on bf16
      models), so their gradients and AdamW state are float32 too, and so are the
      adapters' inputs kept for backward (:func:`lora_activation_bytes`).
    - GaLLoP: k = round(rho * N) weights; SparseAdamW keeps fp32 ``exp_avg`` and
      ``exp_avg_sq`` (8 B each selected weight), a fp32 master copy (4 B) when
      ``dtype`` is narrower than fp32, and flat indices: int32 (4 B) in tensors of
      fewer than 2^31 weights, int64 (8 B) in larger ones (see :func:`index_bytes`). Dense
      gradients are in ``dtype``; with compact gradients a step holds fp32
      gradients for the k selected weights plus the dense gradient of the
      largest single tensor while backward produces it.
    - Estimation (sparse methods): the mean gradient is accumulated in ``.grad``
      (``dtype``); with ``grad_accum_dtype`` float32 and a narrower ``dtype``, a
      float32 sum is kept besides it. With ``offload_grads`` (estimate_gradients(offload=True))
      the device holds two tensors' gradients at most (one being copied out, the next one being
      produced) and the sums, theta's copy and a staging buffer go to ``host``.
    - ``reselect`` ("gallop": --reselect-every, "spiel"): the Reselector's float32 gradient sum
      (one copy of the trainable weights, per rank its shards), the trained weights' values before
      training (``dtype``) and for "gallop" the trained set's own indices; both count k weights,
      the least they hold (GaLLoP re-selection's trained set only grows).
    - ``world_size`` > 1: per rank under FSDP2 with the command's wrapping (:func:`_fsdp`):
      weights, gradients and state sharded, k / world_size selected weights per rank on average
      (the global top-k need not split evenly), plus the all-gathered weights (``weights``) and what
      unsharded gradients and reduce-scatter buffers add at backward's peak (``gradients``,
      ``estimation``). Offloaded estimation then holds on the device that peak and a group's
      gradient shard, and in host memory per rank the shard's sums and theta's shard.
    - Activations: :func:`activation_bytes` when ``batch_size`` (per device) and ``seq_len`` are given, else 0.
    - Evaluation (``evaluation``): the ``gallop`` command evaluates the vanilla and the tuned model
      whole in one process; under FSDP2 on the sharded model itself (``weights``: the shards and the
      groups gathered for a forward), read shard by shard from the checkpoint, except LoRA's, whose
      model is loaded whole on every rank and evaluated whole after the merge. Sparse methods keep for
      the report the selection and its base values (under FSDP2 gathered from every rank into host
      memory: int64 indices, base and tuned values, none of it on the device).
    - Gathering (``gathering``, LoRA under FSDP2): after training each rank loads the whole base
      model again and gathers the tuned adapters into it (one all-gathered tensor at a time) while
      the sharded model holds its shards and its adapters with their AdamW state, and the reloaded
      copy its whole float32 adapters.
    - ``peak``: the largest of the phases (:attr:`MemoryRow.phases`).

    Per-parameter step counters, the selection's scoring workspace and evaluation activations are left out.
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if reselect not in (None, "gallop", "spiel"):
        raise ValueError(f"reselect must be None, 'gallop' or 'spiel', got {reselect!r}")
    layout = _layout(config)
    shapes = layout.shapes
    b = torch.empty((), dtype=dtype).element_size()
    master = STATE_BYTES if b < STATE_BYTES else 0
    n = sum(s.numel() for s in shapes.values())
    lora = sum(
        lora_rank * (s[0] + s[1]) for name, s in shapes.items() if len(s) == 2 and name.split(".")[-2] in lora_targets
    )
    fsdp = _fsdp(layout, world_size)
    shard = fsdp.shard
    per_rank = lambda x: -(-x // world_size)  # noqa: E731
    k = num_to_select(rho, n)
    kr = per_rank(k)
    opt = 2 * STATE_BYTES
    accum = STATE_BYTES if grad_accum_dtype == torch.float32 and b < STATE_BYTES else b
    weights = (shard + fsdp.gathered) * b
    dense_grads = (shard + fsdp.grads) * b
    wide_sum = STATE_BYTES * shard if accum != b else 0
    estimation, host = dense_grads + wide_sum, 0
    # one process: a tensor's gradient being copied out and the next one; FSDP2: a group's, and its shard
    held = 2 * fsdp.largest_shard if world_size == 1 else fsdp.grads_freed
    if offload_grads:
        estimation, host = held * b, shard * accum + shard * b + fsdp.largest_shard * b
    act = lora_act = 0
    if batch_size and seq_len:
        act = activation_bytes(config, batch_size, seq_len, dtype, gradient_checkpointing)
        lora_act = act + lora_activation_bytes(config, batch_size, seq_len, lora_rank, dtype, gradient_checkpointing,
                                               lora_targets)
    compact = STATE_BYTES * kr + (fsdp.largest_shard if world_size == 1 else fsdp.grads_freed) * b
    index = index_bytes(shapes, kr)
    resel = 0
    if reselect is not None:
        resel = STATE_BYTES * shard + b * kr + (index if reselect == "gallop" else 0)
    lora_r = per_rank(lora)
    whole = n * b
    # the report's selection: one process, the optimizer's indices and the base values on the device;
    # FSDP2 gathers it from every rank into host memory once training is over
    kept = 0 if world_size > 1 else index_bytes(shapes, k) + b * k
    evaluated = weights if world_size > 1 else whole  # FSDP2 evaluates the sharded model
    lora_gather = 0
    if world_size > 1:  # the reloaded model, its float32 adapters; the shards, one tensor all-gathered (padded),
        # the sharded adapters and their AdamW state
        lora_gather = whole + STATE_BYTES * lora + (shard + world_size * fsdp.largest_shard) * b + \
            (STATE_BYTES + opt) * lora_r
    return [
        MemoryRow("full FT (AdamW)", n, weights, dense_grads, 2 * b * shard, 0, 0, 0, act, evaluation=evaluated),
        MemoryRow(f"LoRA r={lora_rank}", lora, weights + STATE_BYTES * lora_r, STATE_BYTES * lora_r, opt * lora_r, 0, 0,
                  0, lora_act, evaluation=whole, gathering=lora_gather),
        MemoryRow(f"GaLLoP rho={rho:g}", k, weights, dense_grads, opt * kr, master * kr, index, estimation, act, host,
                  resel, evaluation=evaluated + kept),
        MemoryRow(f"GaLLoP rho={rho:g}, compact grads", k, weights, compact, opt * kr, master * kr, index, estimation,
                  act, host, resel, evaluation=evaluated + kept),
    ]  # fmt: skip


def index_bytes(shapes: dict[str, torch.Size], k: int) -> int:
    """Bytes of ``k`` selected weights' flat indices as a Selection (and SparseAdamW, which
    shares its tensors) stores them: 4 each in tensors of fewer than 2^31 weights, 8 in larger
    ones. Where a tensor has 2^31 weights or more this is an upper bound: how many of the k it
    holds is known only after selection."""
    wide = sum(s.numel() for s in shapes.values() if index_dtype(s.numel()) == torch.int64)
    return 4 * k + 4 * min(k, wide)


def markdown(rows: list[MemoryRow], title: str = "") -> str:
    """The rows as a Markdown table in GiB."""
    gib = lambda x: f"{x / 2**30:.2f}"  # noqa: E731
    cols = ["weights", "gradients", "optimizer_state", "master_weights", "index_lists", "reselection", "estimation",
            "activations", "host_estimation", "evaluation", "gathering"]
    head = [title or "method", "trainable", *(c.replace("_", " ") for c in cols), "peak (GiB)", "peak in"]
    return table(head, [[r.method, f"{r.trainable:,}", *(gib(asdict(r)[c]) for c in cols), gib(r.peak), r.peak_phase]
                        for r in rows])


def main() -> None:
    """Print the plan of the paper's two models in bf16, with the gradient estimated on the device and in
    host memory (activations excluded); ``gallop plan`` does more."""
    for name in ("llama3-8b", "gemma-2b"):
        print(markdown(memory_plan(preset_config(name)), title=f"{name}, bf16") + "\n")
        offloaded = memory_plan(preset_config(name), offload_grads=True)[2:]
        print(markdown(offloaded, title=f"{name}, bf16, offloaded") + "\n")


if __name__ == "__main__":
    main()
