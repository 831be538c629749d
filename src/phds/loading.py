"""Load and save PHDS checkpoints: a plain HF checkpoint (safetensors) plus the `phds.json` sidecar."""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import torch
import transformers
from torch import nn

from phds import dial
from phds.checkpoint import write_checkpoint
from phds.sidecar import Sidecar, attach_sidecar, read_sidecar, sidecar_of  # noqa: F401  sidecar_of: public here too
from phds.tiny import FAMILIES, tiny_model, tiny_tokenizer

logger = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"

# experts implementation name -> the module whose import registers it with transformers' experts interface.
# Filled from above (the package root names the engine), so loading never imports a higher layer itself.
_EXPERTS_MODULES: dict[str, str] = {}


def register_experts_module(name: str, module: str) -> None:
    """Let `load(experts_implementation=name)` import `module` first, which registers `name` with transformers.

    Example: `register_experts_module("phds", "phds.engine")`.
    """
    _EXPERTS_MODULES[name] = module


def default_device() -> torch.device:
    """CUDA when present, else CPU.

    Example: `phds.loading.default_device()`.
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device for `device` (None: `default_device()`), refused at once when it is unknown or absent here.

    Raises:
        ValueError: an unknown device name, or CUDA/MPS asked for where it is not available.

    Example: `resolve_device("cuda:0")`.
    """
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"`device` must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"`device`={device!r} but CUDA is not available on this machine; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"`device`={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                f"use cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"`device`={device!r} but MPS is not available on this machine; use --device cpu")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"`device` must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    return resolved


def _looks_local(name: str) -> bool:
    """A string written as a filesystem path rather than a hub id `name` or `owner/name`."""
    return (
        name.startswith((".", "/", "~"))
        or name.endswith("/")
        or name.count("/") > 1
        or os.sep != "/"
        and os.sep in name
    )


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads its constant once, at import)."""
    import huggingface_hub

    flags = (os.environ.get(name, "").strip().upper() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return huggingface_hub.constants.HF_HUB_OFFLINE or any(flag in ("1", "ON", "YES", "TRUE") for flag in flags)


def check_model_source(name: str, *, local_files_only: bool | None = None) -> None:
    """Refuse at once a model that cannot be loaded: a missing local directory, an invalid or unknown hub name, or a
    hub name that is not cached while the hub is offline, instead of a long traceback (or retries) later.

    Raises:
        FileNotFoundError: a path-like name with no such directory.
        ValueError: a file instead of a directory, a malformed hub name, an unknown hub name, or an uncached hub name
            while offline.

    Example: `check_model_source("out/run1")`.
    """
    if name.startswith(TINY_PREFIX):
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"`model` must be a checkpoint directory or a hub name, got the file {name}")
        return
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    what = "a local checkpoint directory, a hub name like 'owner/name', or tiny:<family>"
    if _looks_local(name):
        raise FileNotFoundError(f"`model`: no such directory: {name} (expected {what})")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise FileNotFoundError(
            f"`model`: no such directory: {name}, and not a valid hub name (expected {what})"
        ) from None
    if isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
        return
    if local_files_only or _hub_offline():
        raise ValueError(
            f"`model`={name!r}: no such local directory, and the hub name is not in the local cache while offline "
            "(HF_HUB_OFFLINE / local_files_only); download it first or pass a local directory"
        )
    try:
        huggingface_hub.HfApi().model_info(name, timeout=10)
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise ValueError(
            f"`model`={name!r}: no such local directory and no such model on the Hugging Face hub (or it is private: "
            "log in with `hf auth login`)"
        ) from None
    except huggingface_hub.errors.HfHubHTTPError:
        return  # gated, rate-limited, ...: from_pretrained reports those with its own advice
    except Exception as error:  # the HTTP client's connection errors: offline
        raise ValueError(
            f"`model`={name!r}: no such local directory, not in the local cache, and the Hugging Face hub cannot be "
            f"reached (offline? {type(error).__name__}); download it first or pass a local directory"
        ) from None


def _resolve_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"`dtype` must be 'auto' or one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def load(
    name_or_path: str | os.PathLike,
    *,
    k: int | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    tokenizer: bool = True,
    experts_implementation: str | None = None,
    trust_remote_code: bool = False,
    local_files_only: bool | None = None,
):
    """Load an MoE model and its tokenizer, dialled to the checkpoint's default k.

    Args:
        name_or_path: a local checkpoint directory, a hub name, or `tiny:<family>` for the built-in tiny random
            model (`tiny:olmoe`, `tiny:mixtral`, ...).
        k: dial to this k instead of the default (the sidecar's `default_k`, else the pretrained `k_pre`).
        dtype: "auto" (the checkpoint's), "float32", "bfloat16", "float16" or a torch dtype.
        device: defaults to CUDA when present, else CPU.
        tokenizer: also load the tokenizer (None is returned when the checkpoint has none).
        experts_implementation: a transformers experts implementation ("eager", "grouped_mm", "batched_mm", ...).
        trust_remote_code: never on unless asked; only transformers' own modelling code runs by default.
        local_files_only: forwarded to `from_pretrained` (defaults to True for a local directory).

    Returns:
        `(model, tokenizer)`; the sidecar, if any, is `phds.loading.sidecar_of(model)`.

    Example: `model, tok = phds.load("allenai/OLMoE-1B-7B-0125", dtype="bfloat16")`.
    """
    device = resolve_device(device)
    name = str(name_or_path)
    if experts_implementation in _EXPERTS_MODULES:
        importlib.import_module(_EXPERTS_MODULES[experts_implementation])
    if name.startswith(TINY_PREFIX):
        arch = name[len(TINY_PREFIX) :]
        if arch not in FAMILIES:
            raise ValueError(f"unknown tiny model {name!r}; choose one of {[TINY_PREFIX + f for f in FAMILIES]}")
        model = tiny_model(arch, dtype=torch.float32 if dtype == "auto" else _resolve_dtype(dtype))
        if experts_implementation is not None:
            model.set_experts_implementation(experts_implementation)
        model.to(device)
        sidecar = None
        tok = tiny_tokenizer() if tokenizer else None
    else:
        check_model_source(name, local_files_only=local_files_only)
        path = Path(name).expanduser()
        name = str(path) if path.is_dir() else name
        if local_files_only is None:
            local_files_only = path.is_dir()
        kwargs = dict(local_files_only=local_files_only, trust_remote_code=trust_remote_code)
        if experts_implementation is not None:
            kwargs["experts_implementation"] = experts_implementation
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                name, dtype=_resolve_dtype(dtype), use_safetensors=True, **kwargs
            )
        except OSError as error:  # a folder without config.json or weights, a failed download: one line
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"`model`={name!r} could not be loaded: {first}") from error
        model.to(device).eval()
        sidecar = read_sidecar(path, model=model) if path.is_dir() else None
        tok = _load_tokenizer(name, **kwargs) if tokenizer else None
    if experts_implementation is not None and not model._can_set_experts_implementation():
        # transformers ignores the request silently on these (Llama 4, JetMoE); an implementation module of this
        # project may still cover them (`apply_to_other_experts`), else say so.
        module = _EXPERTS_MODULES.get(experts_implementation)
        apply = getattr(importlib.import_module(module), "apply_to_other_experts", None) if module else None
        if apply is None or not apply(model):
            raise ValueError(
                f"`experts_implementation`={experts_implementation!r} needs experts that use transformers' experts "
                f"interface, which {type(model).__name__}'s do not; leave it unset (the family's own experts then "
                "run)"
            )
    attach_sidecar(model, sidecar)
    dial.moe_layers(model)  # registers k_pre before anything is dialled; raises for a dense model
    target = k if k is not None else (sidecar.default_k if sidecar is not None else None)
    if target is not None:
        if sidecar is not None and k is not None and k not in sidecar.ks:
            logger.warning("k=%d is not among the checkpoint's declared ks %s", k, sidecar.ks)
        dial.set_k(model, target)
    return model, tok


def _load_tokenizer(name: str, **kwargs):
    try:
        return transformers.AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        logger.warning("no tokenizer loaded for %s: %s", name, error)
        return None


def save(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None, sidecar: Sidecar | None = None) -> Path:
    """Save a plain HF checkpoint (safetensors, `num_experts_per_tok` = k_pre) plus the sidecar, atomically.

    Written by `phds.checkpoint.write_checkpoint`: staged beside `out_dir` and renamed into place (a 0755 folder),
    so a crash mid-save leaves whatever was at `out_dir` before intact.

    Example: `phds.save(model, "out", tokenizer=tok, sidecar=Sidecar(ks=[2, 3, 4], k_pre=4))`.
    """
    with dial.sparsity(model, dial.k_pre(model)):
        return write_checkpoint(model, out_dir, tokenizer=tokenizer, sidecar=sidecar)
