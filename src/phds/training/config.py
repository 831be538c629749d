"""PHDSConfig: TRL's `SFTConfig` plus the fields of a PHDS (or fixed-k oracle) fine-tune.

Every field is a `TrainingArguments` field, so the config works with `HfArgumentParser`, `accelerate launch` and
every Trainer integration unchanged; `phds train` builds one from its options.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import SFTConfig

from phds.schedule import SAMPLING
from phds.sidecar import check_k, check_ks

SELECT_BY = ("k_pre", "mean", "final")


def _installed_trackers() -> list[str]:
    """TensorBoard when installed; W&B when installed and configured (an API key or a mode in the environment)."""
    trackers = []
    if importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None:
        trackers.append("tensorboard")
    if importlib.util.find_spec("wandb") is not None and (
        os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")
    ):
        trackers.append("wandb")
    return trackers or ["none"]


@dataclass(kw_only=True)
class PHDSConfig(SFTConfig):
    r"""Configuration of `phds.training.train`: an `SFTConfig` with the PHDS schedule, routing, LoRA and data fields.

    Parameters that control the schedule:
        ks: the declared k set; None means every integer from ceil(k_pre/2) to k_pre.
        anchor_k: the curriculum's anchor (default: min ks).
        anchor_fraction: share of the last optimizer steps spent ramping to the anchor (0 turns it off).
        k_weights: sampling weights of `ks` (default uniform).
        schedule_seed: seed of the per-step k draw (default: `seed`).
        fixed_k: train a fixed-k oracle at this k instead of PHDS (then `ks` must be None or `[fixed_k]`).
        k_sampling: "global" (the paper) draws one k per optimizer step for the whole model; "layer"
            (Matryoshka-MoE) draws one per MoE layer per step from the same distribution and anchor ramp. The
            load-balancing loss then counts the step's largest k in every layer (the model computes it with one
            `num_experts_per_tok`).

    Parameters that control routing:
        epsilon: weight of dropped experts (0 drops them; 1e-6 reproduces the paper, computing k_pre experts).
        renormalize: rescale the kept top-k weights (None follows the model's router).
        aux_loss_coef: load-balancing loss coefficient, computed at the dialled k (None: the model's own; 0 off).

    Parameters that control checkpoint selection:
        select_by: "k_pre" keeps the checkpoint with the lowest validation loss at k_pre (at the oracle's k for an
            oracle), "mean" the lowest mean over `eval_ks`, "final" the model of the last optimizer step
            (validation still runs and is recorded, but does not choose).
        eval_ks: the ks the validation loss is computed at (`eval_loss_k{k}`) and "mean" averages over; default
            the trained ks. E.g. an SFT at `fixed_k=k_pre` selected like PHDS: `eval_ks=[2, 3, 4]`.

    Parameters that control LoRA (PEFT):
        lora, lora_r, lora_alpha, lora_dropout, lora_target_modules, lora_target_parameters, train_router,
        save_adapter.

    Parameters that control the data:
        eval_fraction, max_eval_samples, prompt_column, completion_column, data_split.

    Example: `PHDSConfig(output_dir="out", ks=[2, 3, 4], anchor_k=2, max_steps=100)`.
    """

    # ------------------------------------------------------------------ defaults that differ from SFTConfig
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Deprecated alias of `activation_checkpointing` (off by default; k is fixed per step, so safe)."
        },
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bfloat16 mixed precision; default: on where CUDA supports it, off on CPU."},
    )
    eval_strategy: str = field(default="steps", metadata={"help": "When to evaluate at every k: 'steps' or 'no'."})
    eval_steps: float | None = field(
        default=0.1, metadata={"help": "Evaluate every N steps (a float < 1 is a fraction of the run)."}
    )
    save_steps: float = field(
        default=0.1, metadata={"help": "Write a resumable Trainer checkpoint every N steps (float < 1: fraction)."}
    )
    save_total_limit: int | None = field(default=2, metadata={"help": "Resumable Trainer checkpoints to keep."})
    max_length: int | None = field(default=1024, metadata={"help": "Maximum tokens per training sequence."})
    report_to: None | str | list[str] = field(
        default=None,
        metadata={"help": "Trackers: default TensorBoard when installed, W&B when installed and configured."},
    )

    # ------------------------------------------------------------------ schedule
    ks: list[int] | None = field(
        default=None,
        metadata={"help": "Declared k set (experts per token) to train for; default ceil(k_pre/2)..k_pre."},
    )
    anchor_k: int | None = field(default=None, metadata={"help": "Anchor k of the final curriculum; default min(ks)."})
    anchor_fraction: float = field(
        default=0.06, metadata={"help": "Share of the last steps ramping to the anchor k; 0 turns the curriculum off."}
    )
    k_weights: list[float] | None = field(
        default=None, metadata={"help": "Sampling weight of each k in ks (same order); default uniform."}
    )
    schedule_seed: int | None = field(default=None, metadata={"help": "Seed of the per-step k draw; default `seed`."})
    fixed_k: int | None = field(
        default=None, metadata={"help": "Train a fixed-k oracle at this k (the same recipe with ks={k})."}
    )
    k_sampling: str = field(
        default="global",
        metadata={
            "help": "Draw one k per optimizer step for the whole model ('global', the paper) or one per MoE layer "
            "('layer', Matryoshka-MoE).",
            "choices": list(SAMPLING),
        },
    )

    # ------------------------------------------------------------------ routing
    epsilon: float = field(
        default=0.0,
        metadata={
            "help": "Weight of dropped experts: 0 drops them, 1e-6 keeps them computed (faithful reproduction)."
        },
    )
    renormalize: bool | None = field(
        default=None, metadata={"help": "Rescale kept top-k weights; default follows the model's router."}
    )
    aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "Load-balancing loss coefficient at the dialled k; default the model's own, 0 disables."},
    )

    # ------------------------------------------------------------------ selection
    select_by: str = field(
        default="k_pre",
        metadata={
            "help": "Keep the checkpoint with the best validation loss at k_pre ('k_pre') or mean over eval_ks "
            "('mean'), or the last step's model ('final').",
            "choices": list(SELECT_BY),
        },
    )
    eval_ks: list[int] | None = field(
        default=None,
        metadata={"help": "The ks validation runs at and 'mean' averages over; default the trained ks."},
    )

    # ------------------------------------------------------------------ LoRA
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (PEFT) instead of every weight."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "nn.Linear modules to adapt; default 'all-linear' (attention, shared experts)."},
    )
    lora_target_parameters: list[str] | None = field(
        default=None,
        metadata={"help": "3-D expert parameters to adapt (e.g. mlp.experts.gate_up_proj); default every routed one."},
    )
    train_router: bool = field(
        default=True, metadata={"help": "Train the routers (fully, also under LoRA); False freezes them."}
    )
    save_adapter: bool = field(
        default=False, metadata={"help": "With LoRA, also save the adapter under OUTPUT_DIR/adapter."}
    )

    # ------------------------------------------------------------------ data
    eval_fraction: float = field(
        default=0.05, metadata={"help": "Share of the training rows held out for validation when no eval data."}
    )
    max_eval_samples: int | None = field(
        default=512, metadata={"help": "At most this many validation rows (each is evaluated at every k)."}
    )
    prompt_column: str | None = field(
        default=None, metadata={"help": "Column to use as `prompt` (e.g. 'question'); default 'prompt'."}
    )
    completion_column: str | None = field(
        default=None, metadata={"help": "Column to use as `completion` (e.g. 'answer'); default 'completion'."}
    )
    data_split: str = field(default="train", metadata={"help": "Split to read from a `datasets` hub name."})

    def __post_init__(self) -> None:
        self._check_phds_fields()
        if self.bf16 is None:
            self.bf16 = bool(not self.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin to; avoids a warning per dataloader
        if self.report_to is None:
            self.report_to = _installed_trackers()
        if self.aux_loss_coef is not None:
            if self.router_aux_loss_coef is not None and self.router_aux_loss_coef != self.aux_loss_coef:
                raise ValueError(
                    f"`aux_loss_coef`={self.aux_loss_coef} and `router_aux_loss_coef`={self.router_aux_loss_coef} "
                    "disagree; set only one"
                )
            self.router_aux_loss_coef = self.aux_loss_coef
        super().__post_init__()

    def _check_phds_fields(self) -> None:
        # Shapes of values only; ks against the model's expert count is checked once the model is known.
        if self.ks is not None:
            check_ks(self.ks)
        if self.eval_ks is not None:
            check_ks(self.eval_ks, name="eval_ks")
        if self.fixed_k is not None:
            check_k(self.fixed_k, name="fixed_k")
            if self.ks is not None and sorted(self.ks) != [self.fixed_k]:
                raise ValueError(f"an oracle trains at one k: `fixed_k`={self.fixed_k} with `ks`={self.ks}; drop `ks`")
            if self.k_weights is not None:
                raise ValueError(f"`k_weights` has no meaning for a fixed-k oracle, got k_weights={self.k_weights!r}")
            if self.k_sampling == "layer":
                raise ValueError(
                    "`k_sampling`='layer' has no meaning for a fixed-k oracle (every layer is always at "
                    f"`fixed_k`={self.fixed_k}); drop one of them"
                )
        if self.k_sampling not in SAMPLING:
            raise ValueError(f"`k_sampling` must be one of {list(SAMPLING)}, got k_sampling={self.k_sampling!r}")
        if self.anchor_k is not None and self.ks is not None and self.anchor_k not in self.ks:
            raise ValueError(
                f"`anchor_k` must be one of the declared ks {sorted(self.ks)}, got anchor_k={self.anchor_k}"
            )
        if not 0.0 <= self.anchor_fraction <= 1.0:
            raise ValueError(f"`anchor_fraction` must be in [0, 1], got anchor_fraction={self.anchor_fraction}")
        if self.k_weights is not None and self.ks is not None and len(self.k_weights) != len(self.ks):
            raise ValueError(f"`k_weights` needs one weight per k in ks={self.ks}, got k_weights={self.k_weights}")
        if not (0.0 <= self.epsilon < 1.0) or not math.isfinite(self.epsilon):
            raise ValueError(f"`epsilon` must be in [0, 1), got epsilon={self.epsilon}")
        if self.aux_loss_coef is not None and (self.aux_loss_coef < 0 or not math.isfinite(self.aux_loss_coef)):
            raise ValueError(f"`aux_loss_coef` must be a finite number >= 0, got aux_loss_coef={self.aux_loss_coef}")
        if self.select_by not in SELECT_BY:
            raise ValueError(f"`select_by` must be one of {list(SELECT_BY)}, got select_by={self.select_by!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"`eval_fraction` must be in [0, 1), got eval_fraction={self.eval_fraction}")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise ValueError(f"`max_eval_samples` must be >= 1 or None, got max_eval_samples={self.max_eval_samples}")
        if self.lora_r < 1:
            raise ValueError(f"`lora_r` must be >= 1, got lora_r={self.lora_r}")
        if self.save_adapter and not self.lora:
            raise ValueError("`save_adapter` needs `lora=True`: a full fine-tune has no adapter to save")
        if self.output_dir is None:
            raise ValueError("`output_dir` is required: where the trained checkpoint and phds.json are written")
        out = Path(self.output_dir).expanduser()
        if out.exists() and not out.is_dir():
            raise ValueError(f"`output_dir`={self.output_dir} is a file, not a directory; choose a directory path")
        self._check_trainer_numbers()

    def _check_trainer_numbers(self) -> None:
        # The Trainer's own numbers, checked here so that nothing (not even `output_dir/checkpoints`) is created
        # for a run that cannot train.
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(
                f"`max_steps` must be >= 1, or -1 to run `num_train_epochs`; got max_steps={self.max_steps}"
            )
        if self.max_steps == -1 and not (math.isfinite(self.num_train_epochs) and self.num_train_epochs > 0):
            raise ValueError(
                f"`num_train_epochs` must be a finite number > 0, got num_train_epochs={self.num_train_epochs}"
            )
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"`learning_rate` must be a finite number > 0, got learning_rate={self.learning_rate}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"`weight_decay` must be a finite number >= 0, got weight_decay={self.weight_decay}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {name}={getattr(self, name)}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"`max_length` must be >= 1 or None, got max_length={self.max_length}")
        if self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got warmup_steps={self.warmup_steps}")
        for name in ("eval_steps", "save_steps", "logging_steps"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be > 0, got {name}={value}")

    @property
    def method(self) -> str:
        """'oracle' for a fixed-k fine-tune, else 'phds'."""
        return "oracle" if self.fixed_k is not None else "phds"
