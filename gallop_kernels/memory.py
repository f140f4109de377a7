"""Memory planner: bytes of weights, gradients, optimizer state, master weights
and index lists for full fine-tuning, LoRA and GaLLoP on a Hugging Face config.

``python -m gallop_kernels.memory`` prints the table for LLaMA-3-8B and Gemma-2B
configs built locally (no download).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import torch

from .reference import num_to_select

# The DoRA/LLM-Adapters commonsense recipe targets these projections.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
STATE_BYTES = 4  # fp32 exp_avg / exp_avg_sq / master entries
INDEX_BYTES = 8  # int64 flat indices


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


def _shapes(config) -> dict[str, torch.Size]:
    """Trainable parameter shapes of the causal LM ``config`` describes (meta device, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n: p.shape for n, p in model.named_parameters()}  # tied weights are listed once


@dataclass
class MemoryRow:
    """Bytes held during training by one method (activations excluded)."""

    method: str
    trainable: int
    weights: int
    gradients: int
    optimizer_state: int
    master_weights: int
    index_lists: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.master_weights + self.index_lists


def memory_plan(
    config,
    rho: float = 0.01,
    lora_rank: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    lora_targets: tuple[str, ...] = LORA_TARGETS,
) -> list[MemoryRow]:
    """Rows for full fine-tuning (AdamW), LoRA at ``lora_rank`` and GaLLoP at ``rho``
    (dense and compact gradients).

    Optimizer state counts fp32 exp_avg and exp_avg_sq (8 B per trainable
    weight; the per-parameter step scalars are left out). Master weights are fp32
    copies kept when ``dtype`` is narrower than fp32. GaLLoP's selection is global:
    k = round(rho * N) weights, with int64 flat indices; with compact gradients a
    step holds fp32 gradients for the k selected weights plus the dense gradient
    of the largest single tensor while backward produces it.
    """
    shapes = _shapes(config)
    b = torch.empty((), dtype=dtype).element_size()
    master = STATE_BYTES if b < STATE_BYTES else 0
    n = sum(s.numel() for s in shapes.values())
    lora = sum(
        lora_rank * (s[0] + s[1]) for name, s in shapes.items() if len(s) == 2 and name.split(".")[-2] in lora_targets
    )
    k = num_to_select(rho, n)
    largest = max(s.numel() for s in shapes.values())
    opt = 2 * STATE_BYTES
    return [
        MemoryRow("full FT (AdamW)", n, n * b, n * b, opt * n, master * n, 0),
        MemoryRow(f"LoRA r={lora_rank}", lora, (n + lora) * b, lora * b, opt * lora, master * lora, 0),
        MemoryRow(f"GaLLoP rho={rho:g}", k, n * b, n * b, opt * k, master * k, INDEX_BYTES * k),
        MemoryRow(f"GaLLoP rho={rho:g}, compact grads", k, n * b, STATE_BYTES * k + largest * b, opt * k, master * k, INDEX_BYTES * k),
    ]  # fmt: skip


def markdown(rows: list[MemoryRow], title: str = "") -> str:
    """The rows as a Markdown table in GiB."""
    gib = lambda x: f"{x / 2**30:.2f}"  # noqa: E731
    cols = ["weights", "gradients", "optimizer_state", "master_weights", "index_lists"]
    head = f"| {title or 'method'} | trainable | " + " | ".join(c.replace("_", " ") for c in cols) + " | total (GiB) |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    for r in rows:
        d = asdict(r)
        lines.append(f"| {r.method} | {r.trainable:,} | " + " | ".join(gib(d[c]) for c in cols) + f" | {gib(r.total)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the memory plan for the preset models."""
    ap = argparse.ArgumentParser(description="GaLLoP memory planner")
    ap.add_argument("--model", action="append", choices=["llama3-8b", "gemma-2b"])
    ap.add_argument("--rho", type=float, default=0.01)
    ap.add_argument("--lora-rank", type=int, default=16)
    args = ap.parse_args(argv)
    for name in args.model or ["llama3-8b", "gemma-2b"]:
        print(markdown(memory_plan(preset_config(name), args.rho, args.lora_rank), title=f"{name}, bf16"))
        print()


if __name__ == "__main__":
    main()
