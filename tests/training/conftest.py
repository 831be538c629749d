"""Fixtures of the training tests: tiny addition SFT rows, plain text, and a small, fast PHDSConfig."""

from __future__ import annotations

import pytest

from phds.training import PHDSConfig

ADDITION = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(8) for b in range(8)]
TEXT = [{"text": "to be or not to be, that is the question " * 2}, {"text": "all the world is a stage " * 3}] * 8


def fast_config(output_dir, **overrides) -> PHDSConfig:
    """A few steps of tiny batches on CPU: seconds per run."""
    values = dict(
        output_dir=str(output_dir),
        max_steps=6,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=3e-3,
        warmup_steps=0,
        max_length=24,
        logging_steps=2,
        eval_steps=3,
        save_strategy="no",  # resumable checkpoints only where a test resumes
        optim="adamw_torch",  # the fused CPU AdamW has a large per-step overhead on tiny models
        eval_fraction=0.125,
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
    )
    values.update(overrides)
    return PHDSConfig(**values)


def resumable_config(output_dir, *, resume: bool, steps: int = 8, **overrides) -> PHDSConfig:
    """A PHDS run over ks 1-4 with resumable checkpoints every 3 steps and validation (so a best-model save) every 4."""
    values = dict(
        ks=[1, 2, 3, 4],
        anchor_fraction=0.25,
        max_steps=steps,
        save_strategy="steps",
        save_steps=3,
        eval_steps=4,
        resume_from_checkpoint="last" if resume else None,
    )
    return fast_config(output_dir, **{**values, **overrides})


@pytest.fixture
def addition_rows() -> list[dict]:
    return list(ADDITION)


@pytest.fixture
def text_rows() -> list[dict]:
    return list(TEXT)
