"""Saving the selected model of a run: a plain HF checkpoint plus `phds.json` in `output_dir`.

The folder is written by `phds.checkpoint.write_checkpoint` (staged beside `output_dir`, swapped in atomically);
the run's own entries of `output_dir` (its resumable checkpoints, its log, the adapter) are carried into each new
version. The model is saved at k_pre with the user's config, not the switches training set (router logits, cache).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn
from transformers import Trainer

from phds import checkpoint, dial
from phds.sidecar import Sidecar
from phds.training import lora
from phds.training.callbacks import LOG_NAME

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
# Entries of output_dir that are the run's, not the saved model's: carried over when the saved model is replaced.
RUN_ENTRIES = (CHECKPOINTS, LOG_NAME, ADAPTER)
# Config switches training turns on; the saved config keeps the user's values.
TRAINING_SWITCHES = ("output_router_logits", "router_aux_loss_coef", "use_cache")


def users_config(model: nn.Module) -> dict[str, Any]:
    """The values of the training switches in `model.config` before training changes them.

    Example: `users_config(model) == {"output_router_logits": False, "use_cache": True, ...}`.
    """
    return {key: getattr(model.config, key) for key in TRAINING_SWITCHES if hasattr(model.config, key)}


def save_checkpoint(
    model: nn.Module,
    out: Path,
    tokenizer,
    sidecar: Sidecar,
    saved_config: dict[str, Any],
    state_dict: dict | None = None,
) -> None:
    """Write `model` (or `state_dict`, a sharded model's gathered weights) at k_pre with `saved_config` to `out`.

    Example: `save_checkpoint(model, Path("out"), tokenizer, Sidecar(ks=[2, 4], k_pre=4), users_config(model))`.
    """
    base_config = model.config
    training_values = {key: getattr(base_config, key) for key in saved_config}
    try:
        for key, value in saved_config.items():
            setattr(base_config, key, value)
        with dial.sparsity(model, dial.k_pre(model)):
            checkpoint.write_checkpoint(
                model, out, tokenizer=tokenizer, sidecar=sidecar, state_dict=state_dict, carry=RUN_ENTRIES
            )
    finally:
        for key, value in training_values.items():
            setattr(base_config, key, value)


class CheckpointSaver:
    """Saves the model a run selects: `saver(model, step, losses)`, called on every rank (a sharded model's full
    state dict is gathered collectively), written by rank zero.

    Args:
        trainer: the run's trainer (for gathering, the rank and the run length).
        out: the output directory.
        tokenizer: saved with the model.
        sidecar_fields: the `Sidecar` fields every save shares (ks, k_pre, method, ...; `made_by` is extended with
            the run length and the saved step).
        saved_config: the user's values of the training switches (`users_config`).
        save_adapter: also save the LoRA adapter under `out/adapter`.

    Example: `BestCheckpointCallback(eval_ks, CheckpointSaver(trainer, out, tok, fields, users_config(model)))`.
    """

    def __init__(
        self,
        trainer: Trainer,
        out: Path,
        tokenizer,
        sidecar_fields: dict[str, Any],
        saved_config: dict[str, Any],
        *,
        save_adapter: bool = False,
    ) -> None:
        self.trainer = trainer
        self.out = out
        self.tokenizer = tokenizer
        self.sidecar_fields = sidecar_fields
        self.saved_config = saved_config
        self.save_adapter = save_adapter

    def __call__(self, model: nn.Module, step: int, losses: dict[int, float]) -> None:
        trainer = self.trainer
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_fsdp_enabled else None
        if not trainer.is_world_process_zero():
            return
        fields = self.sidecar_fields
        sidecar = Sidecar(
            **{**fields, "made_by": {**fields["made_by"], "steps": trainer.state.max_steps, "best_step": step}},
            validation_loss={str(k): loss for k, loss in losses.items()},
        )
        save_checkpoint(lora.merged(model), self.out, self.tokenizer, sidecar, self.saved_config, state_dict)
        if self.save_adapter:
            model.save_pretrained(self.out / ADAPTER)
        logger.info("saved the model of step %d to %s (validation loss %s)", step, self.out, losses)
