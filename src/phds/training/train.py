"""`train`: a PHDS (or fixed-k oracle) fine-tune of an MoE model, end to end.

Read top to bottom: check everything (config, data, model, ks, output directory) before any work, then build the
schedule, LoRA if asked, the trainer and its callbacks, train (resuming if asked), and keep the best checkpoint as a
plain HF checkpoint plus `phds.json` in `output_dir`. Trainer checkpoints for `--resume` live in
`output_dir/checkpoints`, the JSON-lines log in `output_dir/phds_log.jsonl`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers.trainer_utils import get_last_checkpoint

from phds import dial
from phds.loading import TINY_PREFIX, load, save
from phds.schedule import PHDSSchedule, default_ks
from phds.sidecar import Sidecar, write_sidecar
from phds.training.callbacks import (
    LOG_NAME,
    BestCheckpointCallback,
    JsonlLogCallback,
    PHDSCallback,
    RichProgressCallback,
    eval_loss_key,
)
from phds.training.config import PHDSConfig
from phds.training.data import DataSource, prepare_data
from phds.training.trainer import PHDSTrainer

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
# Entries of output_dir that are the run's, not the saved model's: carried over when the best model is replaced.
_RUN_ENTRIES = (CHECKPOINTS, LOG_NAME, ADAPTER)


@dataclass
class TrainResult:
    """What a finished `train` call produced.

    Attributes:
        output_dir: the saved checkpoint (HF format + phds.json).
        method: "phds" or "oracle".
        ks: the declared ks.
        k_history: the k of every optimizer step of the run (resumed runs included).
        validation_loss: {k: loss} of the saved (selected) checkpoint; empty without validation data.
        best_step: optimizer step of the saved checkpoint.
        global_step: optimizer steps run.
        train_loss: mean training loss reported by the Trainer.
        log_path: the JSON-lines log.
    """

    output_dir: Path
    method: str
    ks: list[int]
    k_history: list[int]
    validation_loss: dict[int, float] = field(default_factory=dict)
    best_step: int | None = None
    global_step: int = 0
    train_loss: float | None = None
    log_path: Path | None = None


# ----------------------------------------------------------------------------- checks (before any work)


def _resolve_model(model: str | os.PathLike | nn.Module, tokenizer):
    if isinstance(model, nn.Module):
        if tokenizer is None:
            name = getattr(getattr(model, "config", None), "_name_or_path", "")
            if not name:
                raise ValueError("`tokenizer` is required when `model` is a module built from a config")
            tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        return model, tokenizer, getattr(model.config, "_name_or_path", "") or type(model).__name__
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(
            f"`model` must be a path, a hub name, 'tiny:<arch>' or an nn.Module, got {type(model).__name__}"
        )
    name = os.fspath(model)
    loaded, loaded_tokenizer = load(name, device="cpu", tokenizer=tokenizer is None)
    tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    if tokenizer is None:
        raise ValueError(f"`model`={name!r} has no tokenizer; pass `tokenizer`")
    if name.startswith(TINY_PREFIX):
        loaded.config._name_or_path = name
    return loaded, tokenizer, name


def _resolve_ks(config: PHDSConfig, k_pre: int, num_experts: int) -> list[int]:
    if config.fixed_k is not None:
        ks = [config.fixed_k]
    elif config.ks is not None:
        ks = sorted(config.ks)
    else:
        ks = default_ks(k_pre)
    bad = [k for k in ks if not 1 <= k <= num_experts]
    if bad:
        raise ValueError(f"every k must be between 1 and the model's number of experts ({num_experts}), got ks={ks}")
    return ks


def _resolve_eval_ks(config: PHDSConfig, ks: list[int], k_select: int, num_experts: int) -> list[int]:
    eval_ks = sorted(config.eval_ks) if config.eval_ks is not None else list(ks)
    bad = [k for k in eval_ks if not 1 <= k <= num_experts]
    if bad:
        raise ValueError(
            f"`eval_ks` must be between 1 and the model's number of experts ({num_experts}), got eval_ks={eval_ks}"
        )
    if config.select_by == "k_pre" and k_select not in eval_ks:
        raise ValueError(
            f"`select_by`='k_pre' selects by the loss at k={k_select}, which `eval_ks`={eval_ks} leaves out; "
            f"add {k_select} to eval_ks or use select_by='mean'"
        )
    return eval_ks


def _losses_at(log_history: list[dict], step: int, eval_ks: list[int]) -> dict[int, float]:
    """The per-k validation losses logged at `step` (empty when that step was not evaluated)."""
    for entry in reversed(log_history):
        if entry.get("step") == step and eval_loss_key(eval_ks[0]) in entry:
            return {k: float(entry[eval_loss_key(k)]) for k in eval_ks}
    return {}


def _resume_checkpoint(config: PHDSConfig, out: Path) -> str | None:
    """The Trainer checkpoint to resume from, or None for a fresh run (which must not clobber an earlier one)."""
    checkpoints = out / CHECKPOINTS
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    resume = config.resume_from_checkpoint
    if resume in (None, False, "", "false", "False"):
        if last is not None:
            raise ValueError(
                f"`output_dir`={out} holds checkpoints of an earlier run ({last}); resume it or choose another output_dir"
            )
        return None
    if resume in (True, "true", "True", "last"):
        if last is None:
            logger.warning("nothing to resume in %s: starting a fresh run", checkpoints)
        return last
    if not Path(resume).is_dir():
        raise ValueError(f"`resume_from_checkpoint`={resume!r} is not a checkpoint directory")
    return str(resume)


def _recover_interrupted_save(out: Path) -> None:
    """A crash between the two renames of a save leaves only `.NAME.old`: put it back."""
    old = out.with_name(f".{out.name}.old")
    if not out.exists() and old.is_dir():
        os.replace(old, out)


# ----------------------------------------------------------------------------- LoRA


def _lora_targets(model: nn.Module, layers: list[dial.MoELayer]) -> tuple[list[str], list[str]]:
    """Default LoRA targets: every nn.Linear but the LM head (attention, shared experts), and every 3-D routed
    expert parameter by its `block.experts.param` suffix."""
    head = model.get_output_embeddings()
    linear = sorted(
        {
            name.rpartition(".")[2]
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not head
        }
    )
    names = {id(module): name for name, module in model.named_modules()}
    parameters = set()
    for layer in layers:
        block_leaf = layer.name.rpartition(".")[2]
        experts_leaf = names[id(layer.experts)].rpartition(".")[2]
        for param_name, param in layer.experts.named_parameters(recurse=False):
            if param.dim() == 3:
                parameters.add(f"{block_leaf}.{experts_leaf}.{param_name}")
    return linear, sorted(parameters)


def _apply_lora(model: nn.Module, config: PHDSConfig, layers: list[dial.MoELayer]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    linear, parameters = _lora_targets(model, layers)
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules if config.lora_target_modules is not None else linear,
        target_parameters=config.lora_target_parameters if config.lora_target_parameters is not None else parameters,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora_config)
    # The router is not an nn.Linear; trained fully (it is small) rather than through an adapter.
    for layer in dial.moe_layers(peft_model):
        for param in layer.router.parameters():
            param.requires_grad_(config.train_router)
    return peft_model


def _merged(model: nn.Module) -> nn.Module:
    """A plain transformers model with the adapters folded in (a copy for a PEFT model; the model itself else)."""
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model


# ----------------------------------------------------------------------------- saving


def _write_checkpoint(model: nn.Module, staged: Path, tokenizer, sidecar: Sidecar, state_dict: dict | None) -> None:
    if state_dict is None:
        save(model, staged, tokenizer=tokenizer, sidecar=sidecar)
        return
    # A sharded (FSDP) model: every rank gathered its full state dict; write it as `phds.save` writes a model.
    staged.mkdir(parents=True)
    with dial.sparsity(model, dial.k_pre(model)):
        model.save_pretrained(staged, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(staged)
    write_sidecar(staged, sidecar)


def _atomic_save(
    model: nn.Module, out: Path, tokenizer, sidecar: Sidecar, saved_config: dict, state_dict: dict | None = None
) -> None:
    """Write the checkpoint next to `out`, move the run's own entries (checkpoints, log) into it, swap it in."""
    staged = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staged, ignore_errors=True)
    base_config = model.config
    training_values = {key: getattr(base_config, key) for key in saved_config}
    try:
        for key, value in saved_config.items():  # the saved config is the user's, not the training tweaks
            setattr(base_config, key, value)
        _write_checkpoint(model, staged, tokenizer, sidecar, state_dict)
    finally:
        for key, value in training_values.items():
            setattr(base_config, key, value)
    os.chmod(staged, 0o755)  # a temporary directory is private (0700); a checkpoint is for sharing
    for name in _RUN_ENTRIES:
        if (out / name).exists():
            os.replace(out / name, staged / name)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(staged, out)
    shutil.rmtree(old, ignore_errors=True)


def _describe(data: DataSource | None) -> str | None:
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(data)
    return f"<in-memory {type(data).__name__} of {len(data)} rows>"


# ----------------------------------------------------------------------------- the run


def train(
    model: str | os.PathLike | nn.Module,
    config: PHDSConfig,
    *,
    train_data: DataSource,
    eval_data: DataSource | None = None,
    tokenizer=None,
    callbacks: list[transformers.TrainerCallback] | None = None,
) -> TrainResult:
    """Fine-tune `model` with PHDS over `config.ks` (or a fixed-k oracle with `config.fixed_k`); save the best
    checkpoint to `config.output_dir`.

    Args:
        model: a checkpoint path, a hub name, `tiny:<arch>`, or an already built MoE `nn.Module` (trained in place).
        config: the run's `PHDSConfig`.
        train_data: a local jsonl/json/parquet/csv/txt file, a `datasets` name, a `datasets.Dataset` or a list of
            dicts with `text`, `prompt`+`completion` or `messages`.
        eval_data: validation rows in the same forms; default: `config.eval_fraction` of `train_data`.
        tokenizer: required for a module built from a config; else loaded with the model.
        callbacks: extra `TrainerCallback`s.

    Returns:
        a `TrainResult` (output directory, per-step k, per-k validation loss of the saved checkpoint, ...).

    Raises:
        ValueError: bad input (ks outside 1..num_experts, anchor not declared, missing or empty data, missing
            columns, a non-MoE model, an output_dir holding another run); nothing is written then.

    Example: `train("tiny:olmoe", PHDSConfig(output_dir="out", ks=[2, 3, 4], max_steps=20), train_data=rows)`.
    """
    if not isinstance(config, PHDSConfig):
        raise ValueError(f"`config` must be a PHDSConfig, got {type(config).__name__}")
    if config.lora and (config.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
        raise ValueError(
            "`lora` under FSDP is not supported (the merged checkpoint needs the whole model on one "
            "rank); run LoRA with DDP, e.g. recipes/accelerate/ddp_8gpu.yaml"
        )
    out = Path(config.output_dir)
    out_existed = out.exists()
    _recover_interrupted_save(out)
    resume_from = _resume_checkpoint(config, out)

    # --- data: read and check every row source before touching the model
    train_rows, eval_rows = prepare_data(
        train_data,
        eval_data,
        text_field=config.dataset_text_field,
        prompt_column=config.prompt_column,
        completion_column=config.completion_column,
        eval_fraction=config.eval_fraction,
        max_eval_samples=config.max_eval_samples,
        split=config.data_split,
        seed=config.seed,
    )

    # --- model, ks and schedule
    model, tokenizer, model_name = _resolve_model(model, tokenizer)
    layers = dial.moe_layers(model)  # NotAnMoEError (a ValueError) for a dense model
    k_pre, num_experts = dial.k_pre(model), dial.num_experts(model)
    ks = _resolve_ks(config, k_pre, num_experts)
    schedule = PHDSSchedule(
        ks=ks,
        weights=config.k_weights,
        anchor_k=config.anchor_k if config.fixed_k is None else None,
        anchor_fraction=config.anchor_fraction if config.fixed_k is None else 0.0,
        seed=config.schedule_seed if config.schedule_seed is not None else config.seed,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    k_select = k_pre if k_pre in ks else max(ks)
    eval_ks = _resolve_eval_ks(config, ks, k_select, num_experts)
    saved_config = {
        key: getattr(model.config, key)
        for key in ("output_router_logits", "router_aux_loss_coef", "use_cache")
        if hasattr(model.config, key)
    }

    # --- everything checked: from here on the run writes
    if resume_from is None and (out / LOG_NAME).exists():
        (out / LOG_NAME).unlink()  # a fresh run starts a fresh log
    if config.lora:
        model = _apply_lora(model, config, layers)
    elif not config.train_router:
        for layer in layers:
            for param in layer.router.parameters():
                param.requires_grad_(False)

    made_by = {
        "base_model": model_name,
        "schedule": schedule.to_dict(),
        "data": {
            "train": _describe(train_data),
            "eval": _describe(eval_data),
            "train_rows": len(train_rows),
            "eval_rows": 0 if eval_rows is None else len(eval_rows),
        },
        "seed": config.seed,
        "select_by": config.select_by,
        "eval_ks": eval_ks,
        "mask_epsilon": config.mask_epsilon,
        "renormalize": config.renormalize,
        "lora": config.lora,
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
    }

    def save_best(trained: nn.Module, step: int, losses: dict[int, float]) -> None:
        # Called on every rank: a sharded model's full state dict is gathered collectively, then rank 0 writes.
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_fsdp_enabled else None
        if not trainer.is_world_process_zero():
            return
        sidecar = Sidecar(
            ks=ks,
            k_pre=k_pre,
            default_k=k_select,
            method=config.method,
            anchor_k=schedule.anchor_k if config.method == "phds" else None,
            made_by={**made_by, "steps": trainer.state.max_steps, "best_step": step},
            validation_loss={str(k): loss for k, loss in losses.items()},
        )
        _atomic_save(_merged(trained), out, tokenizer, sidecar, saved_config, state_dict)
        if config.save_adapter:
            trained.save_pretrained(out / ADAPTER)
        logger.info("saved the checkpoint of step %d to %s (validation loss %s)", step, out, losses)

    # --- trainer
    trainer_args = copy.copy(config)
    trainer_args.output_dir = str(out / CHECKPOINTS)
    if eval_rows is None:
        trainer_args.eval_strategy = transformers.IntervalStrategy.NO
    phds_callback = PHDSCallback(
        schedule, epsilon=config.mask_epsilon, renormalize=config.renormalize, history_path=out / LOG_NAME
    )
    best_callback = BestCheckpointCallback(eval_ks, save_best)
    selecting = eval_rows is not None and config.select_by != "final"
    trainer = PHDSTrainer(
        model=model,
        args=trainer_args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=tokenizer,
        callbacks=[
            phds_callback,
            JsonlLogCallback(out / LOG_NAME, phds_callback),
            *([best_callback] if selecting else []),
            *(callbacks or []),
        ],
        eval_ks=eval_ks,
        select_by=config.select_by,
        k_select=k_select,
        mask_epsilon=config.mask_epsilon,
        renormalize=config.renormalize,
    )
    if len(trainer.train_dataset) == 0 or (trainer.eval_dataset is not None and len(trainer.eval_dataset) == 0):
        if not out_existed:
            shutil.rmtree(out, ignore_errors=True)  # the Trainer made its directory; a failed call leaves nothing
        raise ValueError(
            f"no training or validation rows left after tokenisation with `max_length`={config.max_length}: "
            "rows whose completion is cut off entirely are dropped; raise max_length"
        )
    progress = None
    if not config.disable_tqdm:
        progress = RichProgressCallback(phds_callback)
        trainer.remove_callback(transformers.trainer_callback.ProgressCallback)
        trainer.add_callback(progress)

    # --- train
    try:
        output = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        if progress is not None:
            progress.close()  # also when training raised, so the terminal is left usable
    final_step = trainer.state.global_step
    if eval_rows is not None and not _losses_at(trainer.state.log_history, final_step, eval_ks):
        trainer.evaluate()  # the last steps always get a say in the selection (and "final" records their loss)
    if not selecting:
        best_callback.best_losses = _losses_at(trainer.state.log_history, final_step, eval_ks)
        best_callback.best_step = final_step
        save_best(model, final_step, best_callback.best_losses)
    if hasattr(model, "eval"):
        model.eval()

    return TrainResult(
        output_dir=out,
        method=config.method,
        ks=ks,
        k_history=list(phds_callback.k_history),
        validation_loss=dict(best_callback.best_losses),
        best_step=best_callback.best_step,
        global_step=trainer.state.global_step,
        train_loss=getattr(output, "training_loss", None),
        log_path=out / LOG_NAME,
    )


def read_log(output_dir: str | os.PathLike) -> list[dict]:
    """The JSON-lines log of a run: per-step k (`event == "step"`) and every Trainer log (`event == "log"`).

    Example: `[e["k"] for e in read_log("out") if e["event"] == "step"]`.
    """
    path = Path(output_dir) / LOG_NAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
