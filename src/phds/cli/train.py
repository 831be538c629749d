"""`phds train`: PHDS or a fixed-k oracle fine-tune from the command line; builds a PHDSConfig and calls train()."""

from __future__ import annotations

from pathlib import Path

import typer

from phds.cli import app
from phds.cli.common import console, parse_ks, user_errors


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--k-weights must be numbers like '1,1,2', got {text!r}") from None


@app.command("train")
def train_command(
    model: str = typer.Argument(..., help="Checkpoint directory, hub name, or tiny:<arch> (tiny:olmoe, ...)."),
    data: str = typer.Option(
        ..., "--data", help="Training data: a jsonl/json/parquet/csv/txt file or a datasets name."
    ),
    out: Path = typer.Option(  # noqa: B008
        ..., "--out", help="Output directory: the best checkpoint, phds.json, the log, checkpoints."
    ),
    k: str | None = typer.Option(
        None, "--k", help="Declared ks, e.g. '2,3,4' or '2-4'. [default: ceil(k_pre/2)..k_pre]"
    ),
    anchor_k: int | None = typer.Option(None, "--anchor-k", help="Anchor k of the final curriculum. [default: min k]"),
    anchor_fraction: float = typer.Option(
        0.06, "--anchor-fraction", help="Share of last steps ramping to the anchor."
    ),
    k_weights: str | None = typer.Option(
        None, "--k-weights", help="Sampling weights of the ks, e.g. '1,1,2'. [default: uniform]"
    ),
    fixed_k: int | None = typer.Option(None, "--fixed-k", help="Train a fixed-k oracle at this k instead of PHDS."),
    k_sampling: str = typer.Option(
        "global",
        "--k-sampling",
        help="One k per step for the whole model (global, the paper) or one per MoE layer (layer): global|layer.",
    ),
    eval_data: str | None = typer.Option(
        None, "--eval-data", help="Validation data. [default: --eval-fraction of --data]"
    ),
    eval_fraction: float = typer.Option(0.05, "--eval-fraction", help="Share of --data held out for validation."),
    max_eval_samples: int = typer.Option(512, "--max-eval-samples", help="At most this many validation rows."),
    prompt_column: str | None = typer.Option(
        None, "--prompt-column", help="Column used as the prompt (e.g. question)."
    ),
    completion_column: str | None = typer.Option(None, "--completion-column", help="Column used as the completion."),
    text_column: str = typer.Option("text", "--text-column", help="Column of plain text for language modelling."),
    max_steps: int = typer.Option(-1, "--max-steps", help="Optimizer steps; -1 runs --epochs epochs."),
    epochs: float = typer.Option(3.0, "--epochs", help="Epochs when --max-steps is -1."),
    learning_rate: float = typer.Option(2e-5, "--lr", help="Peak learning rate."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per device per micro-batch."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step (all at the same k)."),
    max_length: int = typer.Option(1024, "--max-length", help="Maximum tokens per sequence."),
    packing: bool = typer.Option(False, "--packing/--no-packing", help="Pack rows into --max-length blocks."),
    warmup_steps: float = typer.Option(
        0.0, "--warmup-steps", help="Learning-rate warm-up steps (< 1: fraction of the run)."
    ),
    eval_steps: float = typer.Option(0.1, "--eval-steps", help="Evaluate every N steps (< 1: fraction of the run)."),
    save_steps: float = typer.Option(0.1, "--save-steps", help="Resumable checkpoint every N steps (< 1: fraction)."),
    select_by: str = typer.Option(
        "k_pre",
        "--select-by",
        help="Keep the checkpoint with the best loss at k_pre, the best mean over the eval ks, or the last step's: "
        "k_pre|mean|final.",
    ),
    eval_k: str | None = typer.Option(
        None, "--eval-k", help="ks the validation loss is computed at, e.g. '2,3,4' or '2-4'. [default: the ks]"
    ),
    epsilon: float = typer.Option(0.0, "--epsilon", help="Weight of dropped experts (1e-6: faithful reproduction)."),
    renormalize: bool | None = typer.Option(
        None, "--renormalize/--no-renormalize", help="Rescale kept top-k weights. [default: the router's own]"
    ),
    aux_loss_coef: float | None = typer.Option(
        None,
        "--aux-loss-coef",
        help="Load-balancing loss coefficient at the dialled k (0: off). [default: the model's]",
    ),
    lora: bool = typer.Option(
        False, "--lora", help="Train LoRA adapters (experts through target_parameters); saves a merged checkpoint."
    ),
    lora_r: int = typer.Option(16, "--lora-r", help="LoRA rank."),
    lora_alpha: int = typer.Option(32, "--lora-alpha", help="LoRA alpha."),
    freeze_router: bool = typer.Option(False, "--freeze-router", help="Keep the routers frozen."),
    save_adapter: bool = typer.Option(
        False, "--save-adapter", help="With --lora, also save the adapter under OUT/adapter."
    ),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="Recompute activations to save memory."
    ),
    bf16: bool | None = typer.Option(
        None, "--bf16/--no-bf16", help="bfloat16 mixed precision. [default: on with a bf16 GPU]"
    ),
    seed: int = typer.Option(42, "--seed", help="Seed of the data order, initialisation and k schedule."),
    logging_steps: int = typer.Option(10, "--logging-steps", help="Log every N steps."),
    report_to: str | None = typer.Option(
        None, "--report-to", help="Trackers, e.g. 'tensorboard,wandb' or 'none'. [default: TensorBoard if installed]"
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
) -> None:
    """Fine-tune MODEL with PHDS over the declared ks (or a fixed-k oracle with --fixed-k); keep the best checkpoint."""
    from phds.training import PHDSConfig, train

    with user_errors():
        ks = parse_ks(k) if k is not None else None
        eval_ks = parse_ks(eval_k, option="--eval-k") if eval_k is not None else None
        config = PHDSConfig(
            output_dir=str(out),
            ks=ks,
            anchor_k=anchor_k,
            anchor_fraction=anchor_fraction,
            k_weights=_parse_weights(k_weights),
            fixed_k=fixed_k,
            k_sampling=k_sampling,
            eval_fraction=eval_fraction,
            max_eval_samples=max_eval_samples,
            prompt_column=prompt_column,
            completion_column=completion_column,
            dataset_text_field=text_column,
            max_steps=max_steps,
            num_train_epochs=epochs,
            learning_rate=learning_rate,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=batch_size,
            gradient_accumulation_steps=grad_accum,
            max_length=max_length,
            packing=packing,
            warmup_steps=warmup_steps,
            eval_steps=eval_steps,
            save_steps=save_steps,
            select_by=select_by,
            eval_ks=eval_ks,
            epsilon=epsilon,
            renormalize=renormalize,
            aux_loss_coef=aux_loss_coef,
            lora=lora,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            train_router=not freeze_router,
            save_adapter=save_adapter,
            activation_checkpointing=gradient_checkpointing,
            bf16=bf16,
            seed=seed,
            logging_steps=logging_steps,
            report_to=report_to.split(",") if report_to else None,
            resume_from_checkpoint="last" if resume else None,
        )
        result = train(model, config, train_data=data, eval_data=eval_data)
    losses = ", ".join(f"k={k}: {loss:.4f}" for k, loss in sorted(result.validation_loss.items()))
    console.print(
        f"[bold green]saved[/] {result.output_dir} ({result.method}, ks={result.ks}, best step "
        f"{result.best_step}{', validation loss ' + losses if losses else ''})"
    )
