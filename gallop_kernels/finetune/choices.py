"""The names the ``gallop`` command offers: training methods and evaluation modes.

Torch-free, so ``gallop --help`` and argument errors need no heavy import;
train.py and evaluate.py take their names from here.
"""

from ..criteria import CRITERIA

BASELINES = ("fft", "lora", "dora")  # dense methods: full fine-tuning and peft's LoRA and DoRA
METHODS = CRITERIA + BASELINES  # the criteria train sparsely through select_mask and SparseAdamW
MODES = ("generate", "loglik")
