"""The SFT recipe both model recipes share: Tulu-3 `messages` rows, one epoch, effective batch 128 sequences of up to
4096 tokens, cosine schedule. A starting point for GPUs, not a tuned reproduction of the paper."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from phds.training import PHDSConfig, train

DATA = "allenai/tulu-3-sft-mixture"  # `messages` rows, formatted with the model's chat template


def tulu3_config(
    output_dir: str,
    *,
    ks: list[int],
    fixed_k: int | None = None,
    lora: bool = False,
    num_gpus: int = 8,
) -> PHDSConfig:
    """PHDS over `ks` anchored at min(ks), or a fixed-k oracle with the identical recipe.

    Example: `tulu3_config("runs/olmoe-phds", ks=[4, 5, 6, 7, 8])`.
    """
    per_device = 4
    return PHDSConfig(
        output_dir=output_dir,
        ks=None if fixed_k is not None else ks,
        anchor_k=None if fixed_k is not None else min(ks),
        anchor_fraction=0.06,
        fixed_k=fixed_k,
        select_by="k_pre",
        num_train_epochs=1,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=max(1, 128 // (per_device * num_gpus)),
        learning_rate=1e-4 if lora else 2e-5,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.0,
        max_length=4096,
        bf16=None,  # on where the GPU supports it (the default)
        activation_checkpointing=True,
        eval_steps=0.05,
        save_steps=0.05,
        eval_fraction=0.01,
        max_eval_samples=1024,
        logging_steps=10,
        lora=lora,
        lora_r=64,
        lora_alpha=128,
        seed=0,
    )


def run(model: str, description: str, make_config: Callable[..., PHDSConfig]) -> None:
    """The command line of a recipe: `--out DIR [--fixed-k K] [--lora] [--data NAME] [--resume]`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fixed-k", type=int, default=None)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    config = make_config(args.out, fixed_k=args.fixed_k, lora=args.lora)
    config.resume_from_checkpoint = "last" if args.resume else None
    train(model, config, train_data=args.data)
