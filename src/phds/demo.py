"""`phds demo`: the paper's experiment end to end on a CPU, in minutes, with nothing downloaded.

    1. pretrain   a tiny OLMoE-architecture MoE (16 experts, k_pre = 4) from scratch on the synthetic corpus
    2. sweep      the base model at every k from 1 to k_pre: where does quality fall off?
    3. sft        one fixed-k oracle per declared k, and one PHDS model over all of them (same data, steps, lr, seed)
    4. evaluate   every fine-tuned model at every declared k (quality, agreement, latency), then compare them
    5. report     DIR/report.md with the tables and plots, and a short summary

Every stage writes into its own folder of DIR with a `stage.json` holding the settings it ran with; a re-run with
the same settings reuses finished stages (`force=True` redoes them), and an interrupted training resumes from its
last Trainer checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import phds
from phds import evaluation, training
from phds.demo_data import make_demo_data
from phds.sidecar import Sidecar

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------------
# settings


@dataclass(kw_only=True)
class DemoConfig:
    """Everything the demo's result depends on (the output folder and `force` excepted).

    The defaults are the recipe whose numbers the README records; `quick()` shrinks the steps and the evaluation,
    keeping every stage of the pipeline.
    """

    seed: int = 0
    # model: a tiny OLMoE (no top-k renormalisation, like the real one), trained from scratch
    num_experts: int = 16
    k_pre: int = 4
    hidden_size: int = 64
    expert_size: int = 64
    num_layers: int = 2
    # data: the skills a 2-layer model learns in minutes and that visibly need expert capacity (add and recall
    # stay near chance at this budget and would only dilute the signal)
    skills: tuple[str, ...] = ("reverse", "sort", "sequence", "copy")
    n_pretrain: int = 20000
    n_sft: int = 800  # a small SFT set, several epochs: the regime where one model over K regularises best
    n_eval: int = 240
    # pretraining
    pretrain_steps: int = 1200
    pretrain_lr: float = 3e-3
    # SFT: PHDS over `ks` with the anchor curriculum, and one oracle per k in `ks`
    ks: list[int] = field(default_factory=lambda: [2, 3, 4])
    anchor_k: int = 2
    anchor_fraction: float = 0.1
    sft_steps: int = 600
    sft_lr: float = 1e-3
    batch_size: int = 64
    # evaluation
    eval_limit: int | None = None
    eval_batch_size: int = 32
    max_new_tokens: int = 12  # answers are at most 8 characters
    latency: bool = True

    def __post_init__(self) -> None:
        if self.anchor_k not in self.ks:
            raise ValueError(f"`anchor_k` must be one of `ks` {self.ks}, got {self.anchor_k}")
        if not 1 <= min(self.ks) <= max(self.ks) <= self.num_experts:
            raise ValueError(f"`ks` must lie in 1..num_experts ({self.num_experts}), got {self.ks}")

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        """The `--quick` recipe: same pipeline, fewer steps and a smaller evaluation (about 3 minutes)."""
        return cls(**{**dict(pretrain_steps=500, sft_steps=150, n_eval=120, latency=False), **overrides})

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class DemoResult:
    out_dir: Path
    report: Path
    summary: list[str]
    stages_run: list[str]
    stages_reused: list[str]


# ----------------------------------------------------------------------------------------------------------------------
# stage bookkeeping: a stage is done when its folder holds stage.json with this run's settings


class _Stages:
    def __init__(self, out_dir: Path, config: DemoConfig, force: bool, say: Callable[[str], None]):
        self.out_dir, self.digest, self.force, self.say = out_dir, config.digest(), force, say
        self.ran: list[str] = []
        self.reused: list[str] = []

    def done(self, name: str) -> bool:
        marker = self.out_dir / name / "stage.json"
        if self.force or not marker.is_file():
            return False
        try:
            ok = json.loads(marker.read_text()).get("settings") == self.digest
        except json.JSONDecodeError:
            ok = False
        if ok:
            self.reused.append(name)
            self.say(f"[dim]reusing finished stage[/] {name}")
        return ok

    def start(self, name: str) -> Path:
        """A clean folder for a stage, unless an interrupted attempt with the same settings can be resumed."""
        folder = self.out_dir / name
        attempt = folder / "attempt.json"
        resumable = attempt.is_file() and json.loads(attempt.read_text()).get("settings") == self.digest
        if folder.exists() and (self.force or not resumable):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        attempt.write_text(json.dumps({"settings": self.digest}))
        self.ran.append(name)
        return folder

    def finish(self, name: str, **info: Any) -> None:
        marker = self.out_dir / name / "stage.json"
        marker.write_text(json.dumps({"settings": self.digest, **info}, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# the pipeline


def run_demo(
    out_dir: str | Path,
    config: DemoConfig | None = None,
    *,
    force: bool = False,
    say: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the whole PHDS experiment on the built-in tiny model and data; write `out_dir/report.md`.

    Args:
        out_dir: where every stage writes; re-running into it reuses finished stages.
        config: the recipe (default `DemoConfig()`; `DemoConfig.quick()` for a short run).
        force: redo every stage.
        say: where stage headers and the summary go (the CLI passes rich's console.print); default: logging.

    Example: `phds.demo.run_demo("phds-demo", DemoConfig.quick())`.
    """
    config = config or DemoConfig()
    say = say or (lambda text: logger.info(text))
    threads = torch.get_num_threads()
    # The demo model's matmuls are far too small to gain from intra-op threads, and on a busy machine spinning
    # OpenMP threads slow every step down many times over: one thread is faster and steadier.
    torch.set_num_threads(1)
    try:
        return _run(Path(out_dir), config, force, say)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, config: DemoConfig, force: bool, say: Callable[[str], None]) -> DemoResult:
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(out, config, force, say)
    tokenizer = phds.tiny_tokenizer()
    started = time.perf_counter()
    say(f"PHDS demo into {out}/  (settings {config.digest()}; estimated {_estimate_minutes(config):.0f} min)")

    # --- data: the synthetic skills, written once so every stage (and the user) reads the same files
    data_dir = out / "data"
    if not stages.done("data"):
        stages.start("data")
        data = make_demo_data(
            seed=config.seed,
            n_pretrain=config.n_pretrain,
            n_sft=config.n_sft,
            n_eval=config.n_eval,
            skills=tuple(config.skills),
        )
        files = data.write(data_dir)
        # The base model knows the raw format ("ADD 12+7=19"), not the SFT one: probe it on the same items, raw.
        _write_jsonl(data_dir / "base_mc.jsonl", [{**i, "query": i["body"] + "="} for i in data.eval_mc])
        _write_jsonl(data_dir / "base_em.jsonl", [{**i, "prompt": i["body"] + "="} for i in data.eval_em])
        stages.finish("data", files={name: str(path) for name, path in files.items()})
    eval_tasks = [data_dir / "eval_mc.jsonl", data_dir / "eval_em.jsonl"]
    base_tasks = [data_dir / "base_mc.jsonl", data_dir / "base_em.jsonl"]

    # --- 1. pretrain the base model from scratch, at k_pre
    base_dir = out / "base" / "model"
    if not stages.done("base"):
        say(f"[bold]1/5 pretraining[/] a {config.num_experts}-expert, k_pre={config.k_pre} OLMoE from scratch")
        stages.start("base")
        result = training.train(
            _fresh_model(config),
            _train_config(config, base_dir, fixed_k=config.k_pre, steps=config.pretrain_steps, lr=config.pretrain_lr),
            train_data=str(data_dir / "pretrain.txt"),
            tokenizer=tokenizer,
        )
        _mark_base(base_dir, config)
        stages.finish("base", train_loss=result.train_loss, steps=result.global_step)

    # --- 2. robustness probe of the base model at every k
    if not stages.done("sweep"):
        say("[bold]2/5 sweep[/] of the base model at every k from 1 to k_pre")
        folder = stages.start("sweep")
        sweep = evaluation.sweep(
            _for_evaluation(base_dir),
            ks=list(range(1, config.k_pre + 1)),
            tasks=[str(t) for t in base_tasks],
            out_dir=folder,
            limit=config.eval_limit,
            latency=False,
            model_name="base",
            seed=config.seed,
            batch_size=config.eval_batch_size,
            max_new_tokens=config.max_new_tokens,
        )
        stages.finish("sweep", verdict=sweep.get("verdict"))

    # --- 3. SFT: one oracle per declared k, and PHDS over all of them
    runs = {f"oracle-k{k}": dict(fixed_k=k) for k in config.ks}
    runs["phds"] = dict(ks=config.ks, anchor_k=config.anchor_k, anchor_fraction=config.anchor_fraction)
    for i, (name, how) in enumerate(runs.items(), 1):
        stage = f"sft/{name}"
        if stages.done(stage):
            continue
        say(f"[bold]3/5 SFT[/] {name} ({i}/{len(runs)})")
        folder = stages.start(stage)
        result = training.train(
            str(base_dir),
            _train_config(config, folder / "model", steps=config.sft_steps, lr=config.sft_lr, **how),
            train_data=str(data_dir / "sft_train.jsonl"),
            eval_data=str(data_dir / "sft_valid.jsonl"),
        )
        stages.finish(stage, validation_loss=result.validation_loss, best_step=result.best_step)

    # --- 4. evaluate every model at every declared k, then compare them
    for name in ["base", *runs]:
        stage = f"eval/{name}"
        if stages.done(stage):
            continue
        say(f"[bold]4/5 evaluating[/] {name} at k = {config.ks}")
        folder = stages.start(stage)
        model_dir = base_dir if name == "base" else out / "sft" / name / "model"
        evaluation.evaluate(
            _for_evaluation(model_dir),
            config.ks,
            [str(t) for t in eval_tasks],
            out_dir=folder,
            limit=config.eval_limit,
            latency=config.latency,
            model_name=name,
            seed=config.seed,
            batch_size=config.eval_batch_size,
            max_new_tokens=config.max_new_tokens,
        )
        stages.finish(stage)
    comparison = evaluation.compare(
        [out / "eval" / name for name in ["phds", *[n for n in runs if n != "phds"], "base"]],
        out / "compare",
        labels=["phds", *[n for n in runs if n != "phds"], "base"],
        seed=config.seed,
    )

    # --- 5. the report
    say("[bold]5/5 report[/]")
    summary = summarize(comparison, config)
    report = write_report(
        out, config, comparison, summary, minutes=(time.perf_counter() - started) / 60, reused=len(stages.reused)
    )
    for line in summary:
        say(line)
    say(f"report: {report}")
    return DemoResult(out, report, summary, stages.ran, stages.reused)


# ----------------------------------------------------------------------------------------------------------------------
# pieces of the pipeline


def _fresh_model(config: DemoConfig) -> torch.nn.Module:
    model = phds.tiny_model(
        "olmoe",
        seed=config.seed,
        num_experts=config.num_experts,
        num_experts_per_tok=config.k_pre,
        hidden_size=config.hidden_size,
        intermediate_size=config.expert_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    model.set_experts_implementation("grouped_mm")  # the fastest shipped experts path for training on CPU
    return model.train()


def _train_config(config: DemoConfig, output_dir: Path, *, steps: int, lr: float, **phds_fields):
    return training.PHDSConfig(
        output_dir=str(output_dir),
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=64,
        eval_steps=max(1, steps // 3),
        save_steps=max(1, steps // 3),
        max_length=64,
        seed=config.seed,
        logging_steps=max(1, steps // 20),
        weight_decay=0.0,
        max_eval_samples=200,
        # an interrupted stage continues from its last Trainer checkpoint
        resume_from_checkpoint=True if (output_dir / "checkpoints").is_dir() else None,
        **phds_fields,
    )


def _for_evaluation(model_dir: Path):
    """The checkpoint loaded with the sparse "phds" experts path: each token computes only the experts it keeps,
    so evaluation (and its latency table) sees what a lower k really costs."""
    import phds.engine  # noqa: F401  (registers the "phds" experts implementation)

    return phds.load(model_dir, experts_implementation="phds", device="cpu")


def _mark_base(base_dir: Path, config: DemoConfig) -> None:
    """The pretrained model is a plain MoE, not a PHDS checkpoint: declare it as a base model at k_pre."""
    sidecar = phds.read_sidecar(base_dir)
    made_by = sidecar.made_by if sidecar else {}
    phds.write_sidecar(base_dir, Sidecar(ks=[config.k_pre], k_pre=config.k_pre, method="base", made_by=made_by))


def _estimate_minutes(config: DemoConfig) -> float:
    """A rough wall-clock estimate from one timed training step of the demo model on this machine."""
    model = _fresh_model(config)
    ids = torch.randint(4, 100, (config.batch_size, 20))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        timings.append(time.perf_counter() - start)
    step = sorted(timings)[1]
    train_steps = config.pretrain_steps + (len(config.ks) + 1) * config.sft_steps
    evaluations = config.k_pre + (len(config.ks) + 2) * len(config.ks)  # sweep + every model at every k
    return (train_steps * step * 1.5 + evaluations * config.n_eval * 0.02 + 20 * len(config.ks)) / 60


def _embed(markdown: str) -> str:
    """Another report's body under one of our sections: drop its title, push its headings one level down."""
    lines = markdown.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join("#" + line if line.startswith("#") else line for line in lines).strip()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# ----------------------------------------------------------------------------------------------------------------------
# summary and report


def summarize(comparison: dict[str, Any], config: DemoConfig) -> list[str]:
    """The short printed summary: per k, PHDS vs the oracle at that k (with CIs), then agreement across k.

    Example: `for line in summarize(compare_out, DemoConfig()): print(line)`.
    """
    lines = []
    for row in comparison["oracle_vs_phds"]:
        diff = row["diff"]
        phds_ahead = _phds_ahead(row)
        verdict = "not significant" if not diff["significant"] else ("PHDS better" if phds_ahead else "oracle better")
        lines.append(
            f"{row['task']} k={row['k']}: PHDS {row['phds']['value']:.3f} vs oracle {row['oracle_value']['value']:.3f}"
            f"  Δ {diff['diff']:+.3f} [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}] ({verdict})"
        )
    by_task: dict[str, list[tuple[float, float]]] = {}
    for row in comparison["agreement"]:
        if row["oracles"] is not None:
            by_task.setdefault(row["task"], []).append((row["phds"], row["oracles"]))
    for task, pairs in by_task.items():
        phds_mean = sum(p for p, _ in pairs) / len(pairs)
        oracle_mean = sum(o for _, o in pairs) / len(pairs)
        lines.append(
            f"{task} agreement across k (mean over pairs): PHDS {phds_mean:.3f} vs oracles {oracle_mean:.3f} "
            f"({phds_mean - oracle_mean:+.3f})"
        )
    return lines


def _phds_ahead(row: dict[str, Any]) -> bool:
    """Is PHDS ahead of the oracle in this `oracle_vs_phds` row? Perplexity is better when lower."""
    return row["diff"]["diff"] < 0 if row["metric"] == "ppl" else row["diff"]["diff"] > 0


def shortfall_lines(comparison: dict[str, Any]) -> list[str]:
    """Markdown bullets for every task and k where PHDS is behind the oracle at that k (a tie is not a shortfall).

    Example: `"\n".join(shortfall_lines(phds.evaluation.compare(paths)))`.
    """
    lines = [
        f"- {r['task']} at k={r['k']}: PHDS is behind the oracle by {abs(r['diff']['diff']):.3f} {r['metric']} "
        f"({'significant' if r['diff']['significant'] else 'within the CI'})"
        for r in comparison["oracle_vs_phds"]
        if r["diff"]["diff"] != 0 and not _phds_ahead(r)
    ]
    return lines or ["- nowhere: PHDS matches or beats the oracle at every declared k on every task."]


def copy_plots(out: Path) -> None:
    """Put the comparison's frontier and PHDS's agreement heatmap at the top of `out`, beside report.md."""
    for source in (out / "compare" / "frontier.png", out / "eval" / "phds" / "agreement.png"):
        if source.is_file():
            shutil.copyfile(source, out / source.name)


def write_report(
    out: Path, config: DemoConfig, comparison: dict[str, Any], summary: list[str], *, minutes: float, reused: int = 0
):
    """`out/report.md`: recipe, base sweep, comparison tables (from `compare`), plots and the summary."""
    copy_plots(out)
    lines = [
        "# PHDS demo report",
        "",
        f"Recipe (settings `{config.digest()}`): a {config.num_layers}-layer OLMoE-architecture MoE with "
        f"{config.num_experts} experts, k_pre={config.k_pre}, hidden {config.hidden_size}, pretrained from scratch "
        f"for {config.pretrain_steps} steps on the synthetic skills; then {config.sft_steps} SFT steps for each of: "
        f"PHDS over K={config.ks} (anchor k={config.anchor_k} over the last {config.anchor_fraction:.0%} of steps) "
        f"and one fixed-k oracle per k in K. Same data, steps, learning rate and seed. Wall clock of this invocation "
        f"{minutes:.1f} min" + (f" ({reused} finished stages reused from an earlier run)." if reused else "."),
        "",
        "## Summary",
        "",
        *[f"- {line}" for line in summary],
        "",
        "## Where PHDS falls short of an oracle",
        "",
        *shortfall_lines(comparison),
        "",
        "## Base model: robustness probe (k = 1..k_pre, before any SFT)",
        "",
        _embed((out / "sweep" / "report.md").read_text()),
        "",
        "## Fine-tuned models at every declared k",
        "",
        _embed((out / "compare" / "compare.md").read_text()),
        "",
        "![frontier](frontier.png)",
        "",
        "![agreement of PHDS across k](agreement.png)",
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
