"""Small real-text reproduction of PHDS on 2 CPU cores (under an hour): the demo's pipeline on real English.

    pretrain   a 16-expert, k_pre=4 OLMoE-architecture MoE from scratch on WikiText-2 (OLMoE's own tokenizer)
    sweep      the base model's perplexity at every k from 1 to k_pre
    sft        one fixed-k oracle per k in K = {2, 3, 4} and one PHDS model, on TinyShakespeare (a new domain)
    evaluate   perplexity and top-1 next-token agreement per k on held-out Shakespeare and WikiText test text
    compare    PHDS vs the oracle at its own k, agreement across k, frontier

Usage (reads the data by path; nothing is downloaded, nothing is copied into the repository):

    python recipes/small-real/run.py --data ../shared/data --out runs/small-real [--quick]

Re-running into the same --out reuses finished stages (the demo's stage bookkeeping); docs/results/small-real/
holds the committed results of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import transformers
from rich.console import Console

import phds
from phds import evaluation, training
from phds.demo import DemoConfig, _embed, _Stages, copy_plots, shortfall_lines, summarize
from phds.sidecar import Sidecar

# ----------------------------------------------------------------------------------------------------------------------
# settings (plain assignments, nanoGPT style; --quick shrinks the steps)
SEED = 0
NUM_EXPERTS, K_PRE, HIDDEN, EXPERT_SIZE, LAYERS = 16, 4, 128, 128, 2
KS, ANCHOR_K, ANCHOR_FRACTION = [2, 3, 4], 2, 0.1
SEQ_LEN, BATCH = 64, 8
PRETRAIN_STEPS, PRETRAIN_LR = 240, 3e-3
SFT_STEPS, SFT_LR = 200, 1e-3
EVAL_WINDOWS = 24  # sliding windows of SEQ_LEN tokens per perplexity task (stride SEQ_LEN // 2)
TOKENIZER_FILE = "tokenizers/olmoe-gpt-neox-olmo-dolma-v1_5.json"
# ----------------------------------------------------------------------------------------------------------------------


def olmoe_tokenizer(data: Path) -> transformers.PreTrainedTokenizerFast:
    """OLMoE-1B-7B's own BPE tokenizer (50,280 ids), from the `tokenizers` JSON in the shared data."""
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(data / TOKENIZER_FILE), eos_token="<|endoftext|>", pad_token="<|padding|>"
    )
    tokenizer.model_max_length = 10**9  # evaluation windows long texts itself; training packs to SEQ_LEN
    return tokenizer


def fresh_model(tokenizer) -> torch.nn.Module:
    model = phds.tiny_model(
        "olmoe",
        seed=SEED,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=K_PRE,
        hidden_size=HIDDEN,
        intermediate_size=EXPERT_SIZE,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=(len(tokenizer) + 63) // 64 * 64,
        max_position_embeddings=2 * SEQ_LEN,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model.set_experts_implementation("grouped_mm")
    return model.train()


def train_config(output_dir: Path, *, steps: int, lr: float, **phds_fields) -> training.PHDSConfig:
    return training.PHDSConfig(
        output_dir=str(output_dir),
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        eval_steps=max(1, steps // 3),
        save_steps=max(1, steps // 3),
        max_length=SEQ_LEN,
        packing=True,
        seed=SEED,
        logging_steps=max(1, steps // 25),
        weight_decay=0.0,
        max_eval_samples=32,
        resume_from_checkpoint=True if (output_dir / "checkpoints").is_dir() else None,
        **phds_fields,
    )


def split_text(source: Path, train_path: Path, test_path: Path, held_out: float = 0.1) -> None:
    """The last `held_out` share of the lines is kept for evaluation, never trained on."""
    lines = source.read_text().splitlines(keepends=True)
    cut = int(len(lines) * (1 - held_out))
    train_path.write_text("".join(lines[:cut]))
    test_path.write_text("".join(lines[cut:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("PHDS_DATA", "../shared/data")))
    parser.add_argument("--out", type=Path, default=Path("runs/small-real"))
    parser.add_argument("--quick", action="store_true", help="a few steps of every stage, to check the plumbing")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    if not (args.data / TOKENIZER_FILE).is_file():
        sys.exit(f"error: {args.data} is not the shared data folder (no {TOKENIZER_FILE}); pass --data")
    global PRETRAIN_STEPS, SFT_STEPS, EVAL_WINDOWS
    if args.quick:
        PRETRAIN_STEPS, SFT_STEPS, EVAL_WINDOWS = 24, 6, 8

    started = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    settings = DemoConfig(
        seed=SEED,
        num_experts=NUM_EXPERTS,
        k_pre=K_PRE,
        hidden_size=HIDDEN,
        expert_size=EXPERT_SIZE,
        num_layers=LAYERS,
        pretrain_steps=PRETRAIN_STEPS,
        pretrain_lr=PRETRAIN_LR,
        ks=KS,
        anchor_k=ANCHOR_K,
        anchor_fraction=ANCHOR_FRACTION,
        sft_steps=SFT_STEPS,
        sft_lr=SFT_LR,
        batch_size=BATCH,
        eval_limit=EVAL_WINDOWS,
        n_pretrain=0,
        n_sft=0,
        n_eval=0,
    )
    stages = _Stages(out, settings, args.force, Console(highlight=False).print)
    tokenizer = olmoe_tokenizer(args.data)

    # --- data: pretrain on WikiText-2 (valid split), SFT on TinyShakespeare; hold out the tail of Shakespeare
    data = out / "data"
    if not stages.done("data"):
        stages.start("data")
        split_text(
            args.data / "text" / "tinyshakespeare.txt", data / "shakespeare_train.txt", data / "shakespeare.txt"
        )
        shutil.copyfile(args.data / "text" / "wikitext2_test.txt", data / "wikitext2_test.txt")
        stages.finish("data")
    tasks = [str(data / "shakespeare.txt"), str(data / "wikitext2_test.txt")]

    # --- 1. pretrain
    base = out / "base" / "model"
    if not stages.done("base"):
        print("1/5 pretraining on WikiText-2")
        stages.start("base")
        training.train(
            fresh_model(tokenizer),
            train_config(base, steps=PRETRAIN_STEPS, lr=PRETRAIN_LR, fixed_k=K_PRE),
            train_data=str(args.data / "text" / "wikitext2_valid.txt"),
            tokenizer=tokenizer,
        )
        phds.write_sidecar(
            base, Sidecar(ks=[K_PRE], k_pre=K_PRE, method="base", made_by=phds.read_sidecar(base).made_by)
        )
        stages.finish("base")

    # --- 2. sweep the base model
    if not stages.done("sweep"):
        print("2/5 sweep of the base model at k = 1..k_pre")
        folder = stages.start("sweep")
        evaluation.sweep(
            str(base),
            ks=list(range(1, K_PRE + 1)),
            tasks=tasks,
            out_dir=folder,
            limit=EVAL_WINDOWS,
            latency=False,
            model_name="base",
            max_length=SEQ_LEN,
            seed=SEED,
        )
        stages.finish("sweep")

    # --- 3. SFT on Shakespeare: oracles and PHDS
    runs = {f"oracle-k{k}": dict(fixed_k=k) for k in KS}
    runs["phds"] = dict(ks=KS, anchor_k=ANCHOR_K, anchor_fraction=ANCHOR_FRACTION)
    for name, how in runs.items():
        if stages.done(f"sft/{name}"):
            continue
        print(f"3/5 SFT {name}")
        folder = stages.start(f"sft/{name}")
        training.train(
            str(base),
            train_config(folder / "model", steps=SFT_STEPS, lr=SFT_LR, **how),
            train_data=str(data / "shakespeare_train.txt"),
        )
        stages.finish(f"sft/{name}")

    # --- 4. evaluate and compare
    for name in ["base", *runs]:
        if stages.done(f"eval/{name}"):
            continue
        print(f"4/5 evaluating {name}")
        folder = stages.start(f"eval/{name}")
        evaluation.evaluate(
            str(base if name == "base" else out / "sft" / name / "model"),
            KS,
            tasks,
            out_dir=folder,
            limit=EVAL_WINDOWS,
            latency=True,
            model_name=name,
            max_length=SEQ_LEN,
            seed=SEED,
        )
        stages.finish(f"eval/{name}")
    names = ["phds", *[n for n in runs if n != "phds"], "base"]
    comparison = evaluation.compare([out / "eval" / n for n in names], out / "compare", labels=names, seed=SEED)

    # --- 5. report
    summary = summarize(comparison, settings)
    minutes = (time.perf_counter() - started) / 60
    versions = {
        "phds": phds.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    command = (
        "python recipes/small-real/run.py --data ../shared/data --out " + str(out) + (" --quick" if args.quick else "")
    )
    report = [
        "# PHDS small real-text reproduction",
        "",
        f"Command: `{command}`  ",
        f"Versions: {json.dumps(versions)}  ",
        f"Wall clock of this invocation: {minutes:.1f} min (stages reused from an earlier invocation are not counted).",
        "",
        f"Model: {LAYERS}-layer OLMoE architecture, {NUM_EXPERTS} experts, k_pre={K_PRE}, hidden {HIDDEN}, OLMoE "
        f"tokenizer; pretrained {PRETRAIN_STEPS} steps on WikiText-2 (valid split), then {SFT_STEPS} SFT steps on "
        f"TinyShakespeare (first 90% of lines) for PHDS over K={KS} (anchor {ANCHOR_K}, last {ANCHOR_FRACTION:.0%}) "
        f"and for one oracle per k. Evaluation: perplexity on {EVAL_WINDOWS} windows of {SEQ_LEN} tokens (stride "
        f"{SEQ_LEN // 2}) of held-out Shakespeare (last 10%) and WikiText-2 test; agreement = top-1 next token.",
        "",
        "## Summary",
        "",
        *[f"- {line}" for line in summary],
        "",
        "## Where PHDS falls short of an oracle",
        "",
        *shortfall_lines(comparison),
        "",
        "## Base model sweep",
        "",
        _embed((out / "sweep" / "report.md").read_text()),
        "",
        "## PHDS vs oracles",
        "",
        _embed((out / "compare" / "compare.md").read_text()),
        "",
        "![frontier](frontier.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(report))
    copy_plots(out)
    shutil.copyfile(out / "compare" / "compare.json", out / "results.json")
    print("\n".join(summary))
    print(f"report: {out / 'report.md'}  ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
