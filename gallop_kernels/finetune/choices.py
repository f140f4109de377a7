"""The names the ``gallop`` command offers: training methods and evaluation modes.

Torch-free, so ``gallop --help`` and argument errors need no heavy import;
train.py and evaluate.py take their names from here.
"""

from ..criteria import CRITERIA, GRADIENT_CRITERIA

BASELINES = ("fft", "lora", "dora")  # dense methods: full fine-tuning and peft's LoRA and DoRA
RESELECTING = ("spiel",)  # sparse methods whose set changes during training (Reselector)
# SpIEL's schedule, the public implementation's defaults: reselection_steps, selection_accumulation_steps,
# initial_reselection_rate
SPIEL_EVERY, SPIEL_ACCUMULATE, SPIEL_INITIAL_RATE = 20, 5, 0.2
# the criteria and spiel train sparsely through select_mask and SparseAdamW
METHODS = CRITERIA + RESELECTING + BASELINES
ESTIMATING = GRADIENT_CRITERIA + RESELECTING  # the methods that estimate a mean gradient (spiel: saft's) to select
MODES = ("generate", "loglik")
DEVICES = ("auto", "cpu", "cuda")  # auto: CUDA when torch sees a GPU, else the CPU
DTYPES = ("auto", "float32", "bfloat16")  # auto: bfloat16 on CUDA, float32 on the CPU
DECODES = ("beam", "greedy")  # beam: 4 beams, as LLM-Adapters' commonsense_evaluate.py
EXTRACTS = ("protocol", "lenient")  # protocol: LLM-Adapters' regex; lenient: whole words, any case
TARGETS = ("label", "text")  # what training teaches and log-likelihood mode scores (tasks.Example.choices_scored)
GRAD_ACCUM_DTYPES = ("param", "float32")  # where the selection's mean gradient is summed
OFFLOADS = ("auto", "on", "off")  # --offload-grads: estimate the mean gradient in host memory
# --parallel under torchrun: FSDP2-sharded (the default there) or DDP data-parallel training, or the same on every rank
PARALLELS = ("fsdp", "ddp", "none")
