"""The optional pretraining stage of an experiment: a tiny MoE of any supported family trained from scratch."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from phds.experiment.spec import Pretrain
from phds.tiny import tiny_model, tiny_tokenizer


def pretrain_tokenizer(pretrain: Pretrain):
    """The built-in character-level tokenizer, or a `tokenizers` JSON file with the spec's special tokens."""
    if pretrain.tokenizer == "tiny":
        return tiny_tokenizer()
    path = Path(pretrain.tokenizer)
    if not path.is_file():
        raise ValueError(f"`base.pretrain.tokenizer` {str(path)!r}: no such file (give 'tiny' or a tokenizers JSON)")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), **pretrain.tokenizer_tokens)
    tokenizer.model_max_length = 10**9  # evaluation windows long texts itself; training cuts to max_length
    return tokenizer


def fresh_model(pretrain: Pretrain, tokenizer) -> torch.nn.Module:
    """A randomly initialised model of the spec's family and size (seeded by `pretrain.seed`)."""
    overrides = dict(pretrain.model)
    if pretrain.tokenizer != "tiny":  # the model's vocabulary follows the tokenizer's, padded for fast matmuls
        overrides.setdefault("vocab_size", (len(tokenizer) + 63) // 64 * 64)
        overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
        overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
        overrides.setdefault("bos_token_id", tokenizer.bos_token_id)
    model = tiny_model(pretrain.architecture, seed=pretrain.seed, **overrides)
    model.set_experts_implementation("grouped_mm")  # the fastest shipped experts path for training on CPU
    return model.train()


def pretrain_config(pretrain: Pretrain, output_dir: Path, k_pre: int):
    """The pretraining run: every step at the model's `k_pre`, cosine schedule, no validation."""
    from phds.training import PHDSConfig

    steps = pretrain.steps
    return PHDSConfig(
        output_dir=str(output_dir),
        fixed_k=k_pre,
        max_steps=steps,
        learning_rate=pretrain.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        per_device_train_batch_size=pretrain.batch_size,
        max_length=pretrain.max_length,
        packing=pretrain.packing,
        seed=pretrain.seed,
        logging_steps=max(1, steps // 20),
        save_steps=max(1, steps // 3),
        weight_decay=0.0,
        eval_strategy="no",
        resume_from_checkpoint=True if (output_dir / "checkpoints").is_dir() else None,
    )
