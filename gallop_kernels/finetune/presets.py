"""The paper's models as presets of ``gallop finetune`` / ``compare`` / ``plan`` (torch-free, for the command line).

A preset fills only hyper-parameters that a readable public source states, and names the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The DoRA authors' commonsense-reasoning recipe for LLaMA-3-8B (github.com/NVlabs/DoRA, commonsense_reasoning/):
# llama3_8B_DoRA.sh passes --batch_size 16 --micro_batch_size 16 --num_epochs 3 --learning_rate 1e-4
# --cutoff_len 256 --target_modules q_proj k_proj v_proj up_proj down_proj; its README runs it with rank 32 and
# alpha 64 ("sh llama3_8B_DoRA_r.sh 32 64") and lists LLaMA3-8B-LoRA at r 32, lr 3e-4 and LLaMA3-8B-DoRA at
# r 32, lr 1e-4.
DORA_RECIPE_SOURCE = "NVlabs/DoRA commonsense_reasoning: llama3_8B_DoRA.sh and README (LLaMA3-8B, r 32)"


@dataclass(frozen=True)
class Recipe:
    """A baseline's hyper-parameters, every one stated by ``source``."""

    lr: float
    lora_rank: int
    lora_alpha: int
    targets: tuple[str, ...]
    batch_size: int
    epochs: int
    max_len: int
    source: str

    def train_overrides(self) -> dict:
        """The TrainConfig fields it sets (alpha and targets match the baseline's own: 2 * rank, q/k/v/up/down)."""
        return {"lr": self.lr, "lora_rank": self.lora_rank, "batch_size": self.batch_size, "epochs": self.epochs,
                "max_len": self.max_len}


def _dora_recipe(lr: float) -> Recipe:
    """The DoRA authors' LLaMA-3-8B recipe at learning rate ``lr``."""
    return Recipe(lr=lr, lora_rank=32, lora_alpha=64, targets=("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
                  batch_size=16, epochs=3, max_len=256, source=DORA_RECIPE_SOURCE)


@dataclass(frozen=True)
class Preset:
    """A model of the paper, the GaLLoP hyper-parameters the paper states for it (None: not stated or not
    verified) and the baselines' recipes from cited public sources (``baselines``: method -> Recipe).

    The GaLLoP values below could not be checked against the paper's text (arXiv
    2510.19778, its experimental set-up and appendix were not readable where
    this was written), so every one is None and the run's own options apply.
    What each field would set, and its status:

    ========================  ==========================  ==============================================
    field (option)            llama3-8b / gemma-2b        source
    ========================  ==========================  ==============================================
    model (--model)           meta-llama/Meta-Llama-3-8B  the abstract names "LLaMA3 8B" and "Gemma 2B";
                              / google/gemma-2b           base or instruct checkpoint: not verified
    shape (gallop plan)       memory.preset_config        the models' published configs
    rho (--rho)               None                        not verified
    grad_fraction (d_s)       None                        not verified
    lr (--lr)                 None                        not verified
    steps / epochs            None                        not verified
    batch_size                None                        not verified
    max_len                   None                        not verified
    ========================  ==========================  ==============================================

    Baselines: ``lora`` and ``dora`` on llama3-8b follow the DoRA authors' recipe
    (DORA_RECIPE_SOURCE): rank 32, alpha 64, q/k/v/up/down, batch 16, 3 epochs,
    256 tokens, lr 3e-4 (LoRA) and 1e-4 (DoRA). gemma-2b has no cited recipe.
    """

    model: str
    shape: str
    rho: float | None = None
    grad_fraction: float | None = None
    lr: float | None = None
    steps: int | None = None
    batch_size: int | None = None
    max_len: int | None = None
    baselines: dict[str, Recipe] = field(default_factory=dict)

    def train_overrides(self, method: str | None = None) -> dict:
        """The TrainConfig fields this preset sets for ``method`` (the stated ones only)."""
        keys = ("rho", "grad_fraction", "lr", "steps", "batch_size", "max_len")
        stated = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        recipe = self.baselines.get(method)
        return {**stated, **recipe.train_overrides()} if recipe else stated


PRESETS = {
    "llama3-8b": Preset(model="meta-llama/Meta-Llama-3-8B", shape="llama3-8b",
                        baselines={"lora": _dora_recipe(lr=3e-4), "dora": _dora_recipe(lr=1e-4)}),
    "gemma-2b": Preset(model="google/gemma-2b", shape="gemma-2b"),
}
