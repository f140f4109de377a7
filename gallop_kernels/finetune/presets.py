"""The paper's models as presets of ``gallop finetune`` / ``compare`` / ``plan`` (torch-free, for the command line)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """A model of the paper and the hyper-parameters the paper states for it; None: not stated or not verified.

    The values below could not be checked against the paper's text (arXiv
    2510.19778, its experimental set-up and appendix were not readable where
    this was written), so every hyper-parameter is None and the run's own
    options apply. What each field would set, and its status:

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
    """

    model: str
    shape: str
    rho: float | None = None
    grad_fraction: float | None = None
    lr: float | None = None
    steps: int | None = None
    batch_size: int | None = None
    max_len: int | None = None

    def train_overrides(self) -> dict:
        """The TrainConfig fields this preset sets (the stated ones only)."""
        keys = ("rho", "grad_fraction", "lr", "steps", "batch_size", "max_len")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


PRESETS = {
    "llama3-8b": Preset(model="meta-llama/Meta-Llama-3-8B", shape="llama3-8b"),
    "gemma-2b": Preset(model="google/gemma-2b", shape="gemma-2b"),
}
