"""`train`: a PHDS (or fixed-k oracle) fine-tune of an MoE model, end to end.

Read top to bottom, in four steps: `_plan` checks everything (config, data, model, ks, output directory) before
any work and writes nothing; `_build` makes the trainer (LoRA if asked, callbacks, the checkpoint saver); `_run`
trains (resuming if asked); `_finish` makes sure the last step was validated and, for `select_by="final"` or a
run without validation data, saves the last step's model. The saved model is a plain HF checkpoint plus
`phds.json` in `output_dir`; Trainer checkpoints for `--resume` live in `output_dir/checkpoints`, the JSON-lines
log in `output_dir/phds_log.jsonl`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from phds import checkpoint, dial
from phds.loading import TINY_PREFIX, load
from phds.schedule import PHDSSchedule, default_ks
from phds.sidecar import check_k, check_ks, default_k
from phds.training import lora
from phds.training.callbacks import (
    LOG_NAME,
    BestCheckpointCallback,
    JsonlLogCallback,
    PHDSCallback,
    RichProgressCallback,
    eval_loss_key,
    truncate_log,
)
from phds.training.config import PHDSConfig
from phds.training.data import DataSource, prepare_data
from phds.training.saving import CHECKPOINTS, RUN_ENTRIES, CheckpointSaver, users_config
from phds.training.trainer import PHDSTrainer

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished `train` call produced.

    Attributes:
        output_dir: the saved checkpoint (HF format + phds.json).
        method: "phds" or "oracle".
        ks: the declared ks.
        k_history: the k of every optimizer step of the run (resumed runs included): an int per step, or a
            `{layer_index: k}` dict per step with `k_sampling="layer"`.
        validation_loss: {k: loss} at every eval k of the saved checkpoint; empty without validation data.
        best_step: optimizer step of the saved checkpoint.
        global_step: optimizer steps run.
        train_loss: mean training loss reported by the Trainer.
        log_path: the JSON-lines log.
    """

    output_dir: Path
    method: str
    ks: list[int]
    k_history: list[int | dict[int, int]]
    validation_loss: dict[int, float] = field(default_factory=dict)
    best_step: int | None = None
    global_step: int = 0
    train_loss: float | None = None
    log_path: Path | None = None


@dataclass
class _Plan:
    """Everything `_plan` checked and derived; nothing of it has been written yet."""

    config: PHDSConfig
    out: Path
    out_existed: bool
    resume_from: str | None
    train_rows: Any
    eval_rows: Any
    model: nn.Module
    tokenizer: Any
    layers: list[dial.MoELayer]
    ks: list[int]
    eval_ks: list[int]
    k_select: int
    schedule: PHDSSchedule
    sidecar_fields: dict[str, Any]
    saved_config: dict[str, Any]

    @property
    def selects(self) -> bool:
        """Whether validation chooses the saved model (else the last step's model is saved)."""
        return self.eval_rows is not None and self.config.select_by != "final"


# ----------------------------------------------------------------------------- 1. plan: check everything


def _check_config(config: PHDSConfig) -> None:
    if not isinstance(config, PHDSConfig):
        raise ValueError(f"`config` must be a PHDSConfig, got {type(config).__name__}")
    if config.lora and (config.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
        raise ValueError(
            "`lora` under FSDP is not supported (the merged checkpoint needs the whole model on one "
            "rank); run LoRA with DDP, e.g. recipes/accelerate/ddp_8gpu.yaml"
        )


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


def _prepare_for_trl(model: nn.Module) -> None:
    """Two names TRL's fused LM head reads that some MoE families spell otherwise.

    It runs `model.base_model`: Llama 4's text-only causal LM keeps its backbone at `model` but inherits the
    multimodal prefix `language_model`, so its `base_model` is the whole model; point it at `model`. Its load-balancing
    loss reads `config.num_experts`: Llama 4 and PhiMoE call it `num_local_experts`, DeepSeek-V3 `n_routed_experts`;
    the config answers to `num_experts` too (an alias, like transformers' own `attribute_map`; nothing new is saved).
    """
    if getattr(model, "base_model", None) is model and isinstance(getattr(model, "model", None), nn.Module):
        model.base_model_prefix = "model"
    config = model.config.get_text_config()
    if hasattr(config, "num_experts"):
        return
    field_name = next((f for f in ("num_local_experts", "n_routed_experts") if hasattr(config, f)), None)
    if field_name is not None:
        cls = type(config)
        alias = {**cls.attribute_map, "num_experts": field_name}
        config.__class__ = type(cls.__name__, (cls,), {"attribute_map": alias, "__module__": cls.__module__})


def _checkpoint_step(folder: Path) -> int | None:
    """The step of a complete resumable checkpoint (its trainer state is written last), else None."""
    try:
        return int(json.loads((folder / TRAINER_STATE_NAME).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _resume_checkpoint(config: PHDSConfig, out: Path) -> str | None:
    """The Trainer checkpoint to resume from, or None for a fresh run (which must not clobber an earlier one).

    "last" takes the newest *complete* checkpoint and says which; checkpoints a kill left half-written (by a
    version that wrote them in place) and staging folders are removed, since the resumed run writes those steps
    again."""
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
        if not checkpoints.is_dir():
            logger.warning("nothing to resume in %s: starting a fresh run", checkpoints)
            return None
        for staging in checkpoints.glob(checkpoint.staging_path(f"{PREFIX_CHECKPOINT_DIR}-*").name):
            shutil.rmtree(staging, ignore_errors=True)  # a resumable checkpoint killed while being written
        folders = sorted(
            (path for path in checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if path.name.split("-")[-1].isdigit()),
            key=lambda path: int(path.name.split("-")[-1]),
        )
        complete = [path for path in folders if _checkpoint_step(path) is not None]
        for path in folders:
            if path not in complete:
                logger.warning("removing %s: incomplete (no trainer state), killed while being written", path)
                shutil.rmtree(path, ignore_errors=True)
        if not complete:
            logger.warning("nothing to resume in %s: starting a fresh run", checkpoints)
            return None
        logger.warning("resuming from %s (step %d)", complete[-1], _checkpoint_step(complete[-1]))
        return str(complete[-1])
    if not Path(resume).is_dir():
        raise ValueError(f"`resume_from_checkpoint`={resume!r} is not a checkpoint directory")
    if _checkpoint_step(Path(resume)) is None:
        raise ValueError(
            f"`resume_from_checkpoint`={resume!r} is incomplete (no readable {TRAINER_STATE_NAME}; it was killed "
            "while being written); pass an earlier checkpoint or resume='last'"
        )
    return str(resume)


def _describe(data: DataSource | None) -> str | None:
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(data)
    return f"<in-memory {type(data).__name__} of {len(data)} rows>"


def _declared_ks(config: PHDSConfig, k_pre: int, num_experts: int) -> list[int]:
    """The ks the run trains: the oracle's one k, the configured ks, else ceil(k_pre/2)..k_pre."""
    if config.fixed_k is not None:
        return [check_k(config.fixed_k, name="fixed_k", num_experts=num_experts)]
    return check_ks(config.ks if config.ks is not None else default_ks(k_pre), num_experts=num_experts)


def _eval_ks(config: PHDSConfig, ks: list[int], k_select: int, num_experts: int) -> list[int]:
    """The ks validation runs at: `config.eval_ks`, else the trained ks; they must hold the selection k."""
    eval_ks = check_ks(config.eval_ks if config.eval_ks is not None else ks, name="eval_ks", num_experts=num_experts)
    if config.select_by == "k_pre" and k_select not in eval_ks:
        raise ValueError(
            f"`select_by`='k_pre' selects by the loss at k={k_select}, which `eval_ks`={eval_ks} leaves out; "
            f"add {k_select} to eval_ks or use select_by='mean'"
        )
    return eval_ks


def _check_resumed_sampling(out: Path, k_sampling: str) -> None:
    """A resumed run draws its ks the way the run in `out` did: its log's step lines carry `layer_k` iff per layer."""
    path = out / LOG_NAME
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # the last line of a killed write
        if entry.get("event") == "step":
            logged = "layer" if "layer_k" in entry else "global"
            if logged != k_sampling:
                raise ValueError(
                    f"`k_sampling`={k_sampling!r}, but the run being resumed in {out} was trained with "
                    f"k_sampling={logged!r}; resume it with k_sampling={logged!r} (--k-sampling {logged})"
                )
            return


def _warn_aux_loss_per_layer(config: PHDSConfig, model: nn.Module) -> None:
    """With a k per layer the model computes its load-balancing loss with one k: the step's largest, every layer."""
    text_config = model.config.get_text_config()
    coef = config.router_aux_loss_coef
    coef = getattr(text_config, "router_aux_loss_coef", 0.0) if coef is None else coef
    if config.k_sampling == "layer" and coef and hasattr(text_config, "output_router_logits"):
        logger.warning(
            "k_sampling='layer': the load-balancing loss (coefficient %s) counts the step's largest k in every "
            "layer, since the model computes it with one num_experts_per_tok; aux_loss_coef=0 turns it off",
            coef,
        )


def _made_by(
    config: PHDSConfig, model_name: str, schedule: PHDSSchedule, eval_ks: list[int], data: dict[str, Any]
) -> dict[str, Any]:
    """The sidecar's provenance of the run (the saver adds the run length and the saved step)."""
    return {
        "base_model": model_name,
        "schedule": schedule.to_dict(),
        "k_sampling": schedule.sampling,
        "data": data,
        "seed": config.seed,
        "select_by": config.select_by,
        "eval_ks": eval_ks,
        "epsilon": config.epsilon,
        "renormalize": config.renormalize,
        "lora": config.lora,
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
    }


def _plan(model, config: PHDSConfig, train_data, eval_data, tokenizer) -> _Plan:
    """Check the config, the output directory, the data, the model and the ks; derive the schedule and the
    sidecar. Writes nothing (but finishes a save an earlier crash interrupted)."""
    _check_config(config)
    out = Path(config.output_dir)
    out_existed = out.exists()
    checkpoint.recover(out, carry=RUN_ENTRIES)
    resume_from = _resume_checkpoint(config, out)
    if resume_from is not None:
        _check_resumed_sampling(out, config.k_sampling)

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
    _prepare_for_trl(model)
    layers = dial.moe_layers(model)  # NotAnMoEError (a ValueError) for a dense model
    k_pre, num_experts = dial.k_pre(model), dial.num_experts(model)
    ks = _declared_ks(config, k_pre, num_experts)
    k_select = default_k(ks, k_pre)
    eval_ks = _eval_ks(config, ks, k_select, num_experts)
    oracle = config.fixed_k is not None
    schedule = PHDSSchedule(
        ks=ks,
        weights=config.k_weights,
        anchor_k=None if oracle else config.anchor_k,
        anchor_fraction=0.0 if oracle else config.anchor_fraction,
        seed=config.schedule_seed if config.schedule_seed is not None else config.seed,
        sampling=config.k_sampling,
    )
    _warn_aux_loss_per_layer(config, model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    data = {
        "train": _describe(train_data),
        "eval": _describe(eval_data),
        "train_rows": len(train_rows),
        "eval_rows": 0 if eval_rows is None else len(eval_rows),
    }
    sidecar_fields = {
        "ks": ks,
        "k_pre": k_pre,
        "default_k": k_select,
        "method": config.method,
        "anchor_k": None if oracle else schedule.anchor_k,
        "made_by": _made_by(config, model_name, schedule, eval_ks, data),
    }
    return _Plan(
        config=config,
        out=out,
        out_existed=out_existed,
        resume_from=resume_from,
        train_rows=train_rows,
        eval_rows=eval_rows,
        model=model,
        tokenizer=tokenizer,
        layers=layers,
        ks=ks,
        eval_ks=eval_ks,
        k_select=k_select,
        schedule=schedule,
        sidecar_fields=sidecar_fields,
        saved_config=users_config(model),
    )


# ----------------------------------------------------------------------------- 2. build: from here on the run writes


def _build(
    plan: _Plan, callbacks: list[transformers.TrainerCallback] | None
) -> tuple[PHDSTrainer, PHDSCallback, CheckpointSaver, BestCheckpointCallback]:
    """The trainer with its callbacks, and the saver of the selected model."""
    config, out = plan.config, plan.out
    if plan.resume_from is None and (out / LOG_NAME).exists():
        (out / LOG_NAME).unlink()  # a fresh run starts a fresh log
    plan.model = lora.prepare(plan.model, config, plan.layers)

    trainer_args = copy.copy(config)
    trainer_args.output_dir = str(out / CHECKPOINTS)
    if plan.eval_rows is None:
        trainer_args.eval_strategy = transformers.IntervalStrategy.NO
    phds_callback = PHDSCallback(
        plan.schedule, epsilon=config.epsilon, renormalize=config.renormalize, history_path=out / LOG_NAME
    )
    trainer = PHDSTrainer(
        model=plan.model,
        args=trainer_args,
        train_dataset=plan.train_rows,
        eval_dataset=plan.eval_rows,
        processing_class=plan.tokenizer,
        callbacks=[phds_callback, JsonlLogCallback(out / LOG_NAME, phds_callback), *(callbacks or [])],
        eval_ks=plan.eval_ks,
        select_by=config.select_by,
        k_select=plan.k_select,
        epsilon=config.epsilon,
        renormalize=config.renormalize,
    )
    if plan.resume_from is not None and trainer.is_world_process_zero():
        # the log describes the model's history: drop what the killed attempt did after the checkpoint
        truncate_log(out / LOG_NAME, _checkpoint_step(Path(plan.resume_from)))
    if len(trainer.train_dataset) == 0 or (trainer.eval_dataset is not None and len(trainer.eval_dataset) == 0):
        if not plan.out_existed:
            shutil.rmtree(out, ignore_errors=True)  # the Trainer made its directory; a failed call leaves nothing
        raise ValueError(
            f"no training or validation rows left after tokenisation with `max_length`={config.max_length}: "
            "rows whose completion is cut off entirely are dropped; raise max_length"
        )
    saver = CheckpointSaver(
        trainer, out, plan.tokenizer, plan.sidecar_fields, plan.saved_config, save_adapter=config.save_adapter
    )
    best = BestCheckpointCallback(plan.eval_ks, saver)
    if plan.selects:
        trainer.add_callback(best)
    return trainer, phds_callback, saver, best


# ----------------------------------------------------------------------------- 3. run


def _run(trainer: PHDSTrainer, plan: _Plan, phds_callback: PHDSCallback):
    """Train (resuming if asked) behind a rich progress bar unless progress is disabled."""
    progress = None
    if not plan.config.disable_tqdm:
        progress = RichProgressCallback(phds_callback)
        trainer.remove_callback(transformers.trainer_callback.ProgressCallback)
        trainer.add_callback(progress)
    try:
        return trainer.train(resume_from_checkpoint=plan.resume_from)
    finally:
        if progress is not None:
            progress.close()  # also when training raised, so the terminal is left usable


# ----------------------------------------------------------------------------- 4. finish


def _losses_at(log_history: list[dict], step: int, eval_ks: list[int]) -> dict[int, float]:
    """The per-k validation losses logged at `step` (empty when that step was not evaluated)."""
    for entry in reversed(log_history):
        if entry.get("step") == step and eval_loss_key(eval_ks[0]) in entry:
            return {k: float(entry[eval_loss_key(k)]) for k in eval_ks}
    return {}


def _finish(trainer: PHDSTrainer, plan: _Plan, saver: CheckpointSaver, best: BestCheckpointCallback) -> None:
    """Validate the last step if it was not (it always gets a say in the selection, and "final" records its loss);
    save the last step's model unless validation selects."""
    final_step = trainer.state.global_step
    if plan.eval_rows is not None and not _losses_at(trainer.state.log_history, final_step, plan.eval_ks):
        trainer.evaluate()
    if not plan.selects:
        best.best_step = final_step
        best.best_losses = _losses_at(trainer.state.log_history, final_step, plan.eval_ks)
        saver(plan.model, final_step, best.best_losses)
    if hasattr(plan.model, "eval"):
        plan.model.eval()


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
    """Fine-tune `model` with PHDS over `config.ks` (or a fixed-k oracle with `config.fixed_k`); save the selected
    model (`config.select_by`) to `config.output_dir`.

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
    plan = _plan(model, config, train_data, eval_data, tokenizer)
    trainer, phds_callback, saver, best = _build(plan, callbacks)
    output = _run(trainer, plan, phds_callback)
    _finish(trainer, plan, saver, best)
    return TrainResult(
        output_dir=plan.out,
        method=config.method,
        ks=plan.ks,
        k_history=list(phds_callback.k_history),
        validation_loss=dict(best.best_losses),
        best_step=best.best_step,
        global_step=trainer.state.global_step,
        train_loss=getattr(output, "training_loss", None),
        log_path=plan.out / LOG_NAME,
    )


def read_log(output_dir: str | os.PathLike) -> list[dict]:
    """The JSON-lines log of a run: per-step k (`event == "step"`) and every Trainer log (`event == "log"`).

    Example: `[e["k"] for e in read_log("out") if e["event"] == "step"]` (with `k_sampling="layer"`, `e["k"]` is the
    step's mean over layers and `e["layer_k"]` every layer's k).
    """
    path = Path(output_dir) / LOG_NAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
