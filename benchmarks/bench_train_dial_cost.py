"""Does dialling k every step cost training throughput? PHDS over K vs a fixed-k oracle at the same mean k.

Both runs use the same model, data, batch shape and Trainer; the only difference is the schedule: PHDS draws k
from K each optimizer step (and calls `phds.set_k`), the oracle trains at mean(K) throughout. Routed compute is
linear in k, so equal mean k means equal expert FLOPs: a ratio below 1 is the dial's own overhead.
Runs alternate (oracle, PHDS, oracle, PHDS, ...) and the median tokens/s of each is reported, so drift of a
shared machine hits both alike.

    python benchmarks/bench_train_dial_cost.py                      # tiny CPU setting, about a minute
    python benchmarks/bench_train_dial_cost.py --hidden 256 --layers 4 --seq-len 256 --steps 50
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback

import phds
from phds.schedule import PHDSSchedule
from phds.training import PHDSConfig, train


class _Clock(TrainerCallback):
    """Wall time of the optimizer steps after `skip` warm-up steps."""

    def __init__(self, skip: int):
        self.skip = skip
        self.start: float | None = None
        self.end: float | None = None
        self.steps = 0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.skip:
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > self.skip:
            self.end = time.perf_counter()
            self.steps = state.global_step - self.skip


def _rows(n: int) -> list[dict]:
    text = "the quick brown fox jumps over the lazy dog. " * 4
    return [{"text": text[i % 7 :] + str(i)} for i in range(n)]


def _run(args, *, ks: list[int] | None, fixed_k: int | None, out: Path) -> float:
    config = phds.tiny_config(
        args.arch,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        intermediate_size=args.hidden,
        num_experts_per_tok=max(args.ks),
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    clock = _Clock(skip=args.warmup)
    phds_config = PHDSConfig(
        output_dir=str(out),
        ks=ks,
        fixed_k=fixed_k,
        anchor_fraction=0.0,
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch_size,
        max_length=args.seq_len,
        packing=True,
        packing_strategy="wrapped",
        eval_strategy="no",
        eval_fraction=0.0,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=1000,
        learning_rate=1e-4,
        optim="adamw_torch",
        seed=0,
    )
    train(model, phds_config, train_data=_rows(1024), tokenizer=phds.tiny_tokenizer(), callbacks=[clock])
    return clock.steps * args.batch_size * args.seq_len / (clock.end - clock.start)


def _dial_call_seconds(args) -> float:
    """Seconds of one `phds.set_k` call on the benchmark model (what PHDS adds to each optimizer step)."""
    model = transformers.AutoModelForCausalLM.from_config(
        phds.tiny_config(
            args.arch,
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            intermediate_size=args.hidden,
            num_experts_per_tok=max(args.ks),
        )
    )
    start = time.perf_counter()
    for i in range(200):
        phds.set_k(model, args.ks[i % len(args.ks)])
    return (time.perf_counter() - start) / 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="olmoe")
    parser.add_argument("--ks", default="2,3,4", help="declared ks; the oracle trains at their mean")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 avoids thrashing on a busy shared machine)"
    )
    args = parser.parse_args()
    args.ks = [int(k) for k in args.ks.split(",")]
    mean_k = sum(args.ks) / len(args.ks)
    if mean_k != int(mean_k):
        parser.error(f"--ks must have an integer mean so an oracle can match it, got mean {mean_k}")
    transformers.logging.set_verbosity_error()
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)

    oracle, phds_runs = [], []
    per_k: dict[int, list[float]] = {k: [] for k in args.ks if k != int(mean_k)}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            oracle.append(_run(args, ks=None, fixed_k=int(mean_k), out=Path(tmp) / f"oracle{repeat}"))
            phds_runs.append(_run(args, ks=args.ks, fixed_k=None, out=Path(tmp) / f"phds{repeat}"))
            for k in per_k:  # oracles at the other ks, for the compute-matched comparison
                per_k[k].append(_run(args, ks=None, fixed_k=k, out=Path(tmp) / f"oracle{repeat}k{k}"))
            print(
                f"repeat {repeat}: oracle k={int(mean_k)} {oracle[-1]:,.0f} tok/s, "
                f"PHDS K={args.ks} {phds_runs[-1]:,.0f} tok/s, "
                + ", ".join(f"oracle k={k} {runs[-1]:,.0f} tok/s" for k, runs in per_k.items())
            )
    # What PHDS would reach if each of its steps cost exactly what an oracle step at that step's k costs.
    tps_at = {**{k: statistics.median(runs) for k, runs in per_k.items()}, int(mean_k): statistics.median(oracle)}
    timed = PHDSSchedule(ks=args.ks, anchor_fraction=0.0, seed=0).sequence(args.warmup + args.steps)[args.warmup :]
    matched_tps = len(timed) / sum(1 / tps_at[k] for k in timed)
    oracle_tps, phds_tps = statistics.median(oracle), statistics.median(phds_runs)
    pair_ratios = [p / o for p, o in zip(phds_runs, oracle, strict=True)]
    dial_s = _dial_call_seconds(args)
    step_s = args.batch_size * args.seq_len / oracle_tps
    print(
        f"device: {phds.loading.default_device()}, torch threads: {torch.get_num_threads()}, arch {args.arch}, "
        f"hidden {args.hidden}, layers {args.layers}, batch {args.batch_size}x{args.seq_len} tokens"
    )
    print(f"oracle (k={int(mean_k)}): {oracle_tps:,.0f} tokens/s (median of {args.repeats})")
    print(f"PHDS (K={args.ks}, mean k={mean_k:g}): {phds_tps:,.0f} tokens/s (median of {args.repeats})")
    print(
        f"PHDS / oracle throughput: {phds_tps / oracle_tps:.3f}x (goal >= 0.97x); per alternating pair: "
        f"{', '.join(f'{r:.3f}' for r in pair_ratios)}"
    )
    print(f"PHDS / compute-matched oracle mix (each step at the oracle cost of its k): {phds_tps / matched_tps:.3f}x")
    print(
        f"one phds.set_k call: {dial_s * 1e3:.2f} ms = {100 * dial_s / step_s:.2f}% of a median oracle step "
        f"({step_s * 1e3:.0f} ms)"
    )


if __name__ == "__main__":
    main()
