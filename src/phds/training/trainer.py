"""PHDSTrainer: TRL's `SFTTrainer` whose evaluation runs the validation set at every declared k.

Training itself is unchanged: the k of each optimizer step is dialled by `PHDSCallback`, and the load-balancing
loss that `SFTTrainer` adds is computed by the model at the dialled k (the dial keeps `num_experts_per_tok` equal
to it). Only evaluation changes: one pass per k inside `phds.sparsity`, logged as `eval_loss_k{k}`, and
`eval_loss` becomes the checkpoint-selection score (the loss at the selection k, or the mean over the ks).
"""

from __future__ import annotations

import logging
import os
import shutil

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput, rotate_checkpoints
from trl import SFTTrainer

from phds import checkpoint, dial
from phds.training.callbacks import eval_loss_key

logger = logging.getLogger(__name__)

EXTRA_WEIGHTS = "phds_extra_trainable.safetensors"


def staging_run_dir(run_dir: str | os.PathLike, step: int) -> str:
    """The folder a resumable checkpoint of `step` is written in before it is renamed to `run_dir/checkpoint-N`
    (named by `phds.checkpoint.staging_path`, the one staging rule).

    Example: `staging_run_dir("out/checkpoints", 6) == "out/checkpoints/.checkpoint-6.staging"`.
    """
    return str(checkpoint.staging_path(os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")))


def selection_score(losses: dict[int, float], *, select_by: str, k_select: int) -> float:
    """The number checkpoint selection minimises: the loss at `k_select` ("k_pre") or the mean over ks ("mean").

    "final" selects nothing (the last step's model is kept); its score is the mean, reported as `eval_loss`.

    Example: `selection_score({2: 3.1, 4: 2.9}, select_by="mean", k_select=4) == 3.0`.
    """
    if select_by in ("mean", "final"):
        return sum(losses.values()) / len(losses)
    if select_by == "k_pre":
        return losses[k_select]
    raise ValueError(f"`select_by` must be 'k_pre', 'mean' or 'final', got {select_by!r}")


class PHDSTrainer(SFTTrainer):
    """`SFTTrainer` evaluating at every k of `eval_ks`.

    Args:
        eval_ks: the ks the validation set is evaluated at (default: the declared ks).
        select_by: "k_pre", "mean" or "final" (see `selection_score`).
        k_select: the k whose loss "k_pre" selection uses.
        epsilon, renormalize: the routing options training uses, applied at evaluation too.
        *args, **kwargs: `SFTTrainer`'s.

    Example: `PHDSTrainer(model=model, args=config, train_dataset=rows, eval_dataset=val, eval_ks=[2, 3, 4])`.
    """

    def __init__(
        self,
        *args,
        eval_ks: list[int],
        select_by: str = "k_pre",
        k_select: int | None = None,
        epsilon: float = 0.0,
        renormalize: bool | None = None,
        **kwargs,
    ) -> None:
        self.eval_ks = sorted(eval_ks)
        self.select_by = select_by
        self.k_select = k_select if k_select is not None else max(self.eval_ks)
        if select_by == "k_pre" and self.k_select not in self.eval_ks:
            raise ValueError(f"`k_select`={self.k_select} must be one of the evaluated ks {self.eval_ks}")
        self.epsilon = epsilon
        self.renormalize = renormalize
        super().__init__(*args, **kwargs)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ) -> EvalLoopOutput:
        losses: dict[int, float] = {}
        last: EvalLoopOutput | None = None
        # Validation loss is the language-modelling loss alone: the load-balancing term differs between ks and
        # would bias the comparison and the selection.
        aux_loss_enabled, self.aux_loss_enabled = self.aux_loss_enabled, False
        try:
            for k in self.eval_ks:
                with dial.sparsity(self.model, k, epsilon=self.epsilon, renormalize=self.renormalize):
                    last = super().evaluation_loop(
                        dataloader, f"{description} at k={k}", prediction_loss_only, ignore_keys, metric_key_prefix
                    )
                losses[k] = float(last.metrics[f"{metric_key_prefix}_loss"])
        finally:
            self.aux_loss_enabled = aux_loss_enabled
        metrics = dict(last.metrics)
        for k, loss in losses.items():
            metrics[eval_loss_key(k).replace("eval", metric_key_prefix, 1)] = loss
        metrics[f"{metric_key_prefix}_loss"] = selection_score(
            losses, select_by=self.select_by, k_select=self.k_select
        )
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=last.num_samples)

    # ------------------------------------------------------------------ resumable checkpoints

    def _extra_trainable(self) -> dict[str, torch.nn.Parameter]:
        """Trainable parameters a PEFT adapter checkpoint leaves out (the routers, trained fully under LoRA)."""
        if not hasattr(self.model, "peft_config"):
            return {}
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad and "lora_" not in name}

    def _save_checkpoint(self, model, trial) -> None:
        """Write the resumable checkpoint aside (`.checkpoint-N.staging/checkpoint-N`) and rename it into place, so
        a kill mid-write never leaves a `checkpoint-N` that `--resume` would pick and fail on."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = staging_run_dir(run_dir, self.state.global_step)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # a leftover of a killed attempt at this step
        self._barrier()
        real_output_dir, self.args.output_dir = self.args.output_dir, staging
        try:
            super()._save_checkpoint(model, None)  # everything, the trainer state last, into the staging folder
        finally:
            self.args.output_dir = real_output_dir
        extra = self._extra_trainable()
        if extra and self.args.should_save:
            save_file(
                {key: p.detach().cpu().contiguous() for key, p in extra.items()},
                os.path.join(staging, name, EXTRA_WEIGHTS),
            )
        self._barrier()  # every rank's shards are written before the rename
        if self.args.should_save:
            checkpoint.crash_point("trainer_checkpoint.staged")
            target = os.path.join(run_dir, name)
            shutil.rmtree(target, ignore_errors=True)  # an incomplete folder of an older version, same step
            os.replace(os.path.join(staging, name), target)
            shutil.rmtree(staging, ignore_errors=True)
            if self.state.best_global_step:
                best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
                if os.path.exists(best):
                    self.state.best_model_checkpoint = best
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self._barrier()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        checkpoint.crash_point("trainer_checkpoint.model_written")  # the weights are written, nothing else yet
        super()._save_optimizer_and_scheduler(output_dir)

    @staticmethod
    def _barrier() -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.model if model is None else model
        if isinstance(model, transformers.PreTrainedModel) and not self.is_fsdp_enabled:
            # `save_pretrained` writes MoE experts in the checkpoint's original per-expert layout, which the
            # Trainer's plain `load_state_dict` does not convert back (transformers 5 leaves the fused expert
            # tensors untouched, with a warning). Reading through `from_pretrained` applies the conversion.
            logger.info("loading model weights from %s through from_pretrained", resume_from_checkpoint)
            reloaded = type(model).from_pretrained(resume_from_checkpoint, dtype=model.dtype)
            model.load_state_dict(reloaded.state_dict(), strict=True)
            del reloaded
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        extra_file = os.path.join(resume_from_checkpoint, EXTRA_WEIGHTS)
        if os.path.isfile(extra_file):
            extra = self._extra_trainable()
            with torch.no_grad():
                for name, value in load_file(extra_file).items():
                    extra[name].copy_(value)
