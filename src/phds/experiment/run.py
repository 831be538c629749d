"""`run_experiment`: every arm × seed of a spec trained, evaluated and compared, resumable stage by stage.

    data       generate the data the spec asks for (optional)                     OUT/data/
    base       pretrain the base model (optional; else the spec's base model)   OUT/base/model/
    runs       one SFT per (training run, seed): arms that train identically   OUT/runs/{run}/seed{s}/model/
               share a run (with the final-step rule, `sft-dialled` IS the oracle at k_pre); with several jobs,
               each job's output goes to OUT/logs/
    eval       each run (and the base model) at every k an arm needs           OUT/eval/{run}/seed{s}/
               and, for a policy arm, its calibrated policies             OUT/eval/{run}/seed{s}/{arm}/
    analysis   run-level comparisons, verdicts against the declared margin    OUT/results.json, OUT/report.md

Every stage folder holds `stage.json` with the settings it ran with; a re-run reuses a stage whose settings are
unchanged (so adding seeds only runs the new ones) and an interrupted SFT resumes from its last Trainer checkpoint.
The spec's judging rules (margin, checkpoint rule, statistics, reference) are written to OUT/spec.json before
anything runs and may not change once runs exist: a margin chosen after seeing results is not a margin.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import json
import logging
import multiprocessing
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from phds.experiment.spec import ExperimentSpec

logger = logging.getLogger(__name__)

SPEC_NAME = "spec.json"
RESULTS_NAME = "results.json"
JUDGING = ("margin", "checkpoint", "statistics", "reference", "confidence")


# ----------------------------------------------------------------------------------------------------------------------
# the plan: which training runs and evaluations the arms need


@dataclass
class TrainingRun:
    """One SFT recipe; every arm whose training is identical shares it (and its seeds' checkpoints)."""

    name: str
    fields: dict[str, Any]  # PHDSConfig fields that define the run


@dataclass
class Evaluation:
    """One model (a run at a seed, or the base model) evaluated on one task list at the ks its arms need."""

    folder: str  # relative to OUT/eval
    run: str | None  # None: the base model
    seed: int | None
    tasks: list[str]
    ks: list[int] = field(default_factory=list)
    policy: str | None = None  # a policy arm's: its ks are budgets (mean experts per token) to calibrate to


@dataclass
class Plan:
    k_pre: int
    runs: dict[str, TrainingRun]
    run_of_arm: dict[str, str | None]  # arm -> training run (None: base)
    evaluations: dict[str, Evaluation]  # folder -> evaluation
    eval_of: dict[tuple[str, int], str]  # (arm, seed) -> evaluation folder
    ks_of_arm: dict[str, list[int]]


def plan(spec: ExperimentSpec, k_pre: int) -> Plan:
    """Decide the training runs and evaluations of `spec` for a base model with `k_pre` experts per token.

    Example: `plan(spec, 4).runs` -> {"phds": ..., "oracle-k2": ..., ...}.
    """
    runs: dict[str, TrainingRun] = {}
    run_of_arm: dict[str, str | None] = {}
    ks_of_arm: dict[str, list[int]] = {}
    validation = spec.checkpoint == "validation"
    for arm in spec.arms:
        if arm.kind in ("phds", "phds-layer"):
            how = dict(ks=arm.ks, anchor_k=arm.anchor_k, anchor_fraction=arm.anchor_fraction)
            if arm.kind == "phds-layer":
                how["k_sampling"] = "layer"
            how.update(select_by="mean" if validation else "final", eval_ks=arm.ks)
            ks_of_arm[arm.name] = list(arm.ks)
        elif arm.kind == "oracle":
            how = dict(fixed_k=arm.k, select_by="mean" if validation else "final", eval_ks=[arm.k])
            ks_of_arm[arm.name] = [arm.k]
        elif arm.kind == "sft-dialled":
            # selected like PHDS: by the mean validation loss over K
            how = dict(fixed_k=k_pre, select_by="mean" if validation else "final", eval_ks=spec.ks)
            ks_of_arm[arm.name] = list(spec.ks)
        elif arm.kind == "policy":
            continue  # reuses its `of` arm's runs, below
        else:
            run_of_arm[arm.name] = None
            ks_of_arm[arm.name] = list(spec.ks)
            continue
        same = next((run for run in runs.values() if _defines(run.fields) == _defines(how)), None)
        if same is None:
            same = runs.setdefault(arm.name, TrainingRun(arm.name, how))
        else:  # a shared run reports validation loss at every k any of its arms needs
            same.fields["eval_ks"] = sorted(set(same.fields["eval_ks"]) | set(how["eval_ks"]))
        run_of_arm[arm.name] = same.name
    for arm in spec.arms:
        if arm.kind == "policy":
            run_of_arm[arm.name] = run_of_arm[arm.of]
            budgets = arm.budgets if arm.budgets is not None else [k for k in spec.ks if k < k_pre]
            if not budgets or max(budgets) > k_pre:
                raise ValueError(
                    f"policy arm {arm.name!r}: budgets {budgets} must be non-empty and at most k_pre={k_pre} "
                    "(a policy keeps at most k_pre experts)"
                )
            ks_of_arm[arm.name] = list(budgets)

    evaluations: dict[str, Evaluation] = {}
    eval_of: dict[tuple[str, int], str] = {}
    for arm in spec.arms:
        tasks = arm.tasks or spec.data.tasks
        run = run_of_arm[arm.name]
        for seed in spec.seeds:
            base = "base" if run is None else f"{run}/seed{seed}"
            if arm.kind == "policy":
                folder = f"{base}/{arm.name}"
            else:
                folder = base if arm.tasks is None else f"{base}/{arm.name}-tasks"
            evaluation = evaluations.setdefault(
                folder, Evaluation(folder, run, None if run is None else seed, list(tasks), policy=arm.policy)
            )
            evaluation.ks = sorted(set(evaluation.ks) | set(ks_of_arm[arm.name]))
            eval_of[(arm.name, seed)] = folder
    return Plan(k_pre, runs, run_of_arm, evaluations, eval_of, ks_of_arm)


def _defines(fields: dict[str, Any]) -> tuple:
    """What makes two runs train the same model: the k they train at and how their checkpoint is chosen (under the
    final-step rule the ks validated at choose nothing, so an oracle at k_pre and `sft-dialled` are one run)."""
    ignored = {"eval_ks"} if fields.get("select_by") == "final" else set()
    return tuple(sorted((key, json.dumps(value)) for key, value in fields.items() if key not in ignored))


# ----------------------------------------------------------------------------------------------------------------------
# stage bookkeeping


class Stages:
    """A stage is done when its folder holds `stage.json` with the settings it is asked to run with."""

    def __init__(self, out: Path, force: bool):
        self.out, self.force = out, force
        self.ran: list[str] = []
        self.reused: list[str] = []

    def done(self, name: str, settings: dict[str, Any]) -> bool:
        marker = self.out / name / "stage.json"
        if self.force or not marker.is_file():
            return False
        try:
            ok = json.loads(marker.read_text()).get("settings") == _jsonable(settings)
        except json.JSONDecodeError:
            ok = False
        if ok:
            self.reused.append(name)
        return ok

    def start(self, name: str, settings: dict[str, Any]) -> Path:
        """A clean folder for a stage, unless an interrupted attempt with the same settings can be resumed."""
        folder = self.out / name
        attempt = folder / "attempt.json"
        try:
            resumable = attempt.is_file() and json.loads(attempt.read_text()) == _jsonable(settings)
        except json.JSONDecodeError:
            resumable = False
        if folder.exists() and (self.force or not resumable):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        attempt.write_text(json.dumps(_jsonable(settings)))
        self.ran.append(name)
        return folder

    def finish(self, name: str, settings: dict[str, Any], **info: Any) -> None:
        marker = self.out / name / "stage.json"
        marker.write_text(json.dumps({"settings": _jsonable(settings), **info}, indent=1) + "\n")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ----------------------------------------------------------------------------------------------------------------------
# the experiment


@dataclass
class ExperimentResult:
    out_dir: Path
    results: dict[str, Any]
    report: Path
    summary: list[str]
    stages_run: list[str]
    stages_reused: list[str]


def run_experiment(
    spec: ExperimentSpec,
    out_dir: str | Path,
    *,
    force: bool = False,
    jobs: int = 1,
    threads: int | None = None,
    say: Callable[[str], None] | None = None,
    command: str | None = None,
) -> ExperimentResult:
    """Train every arm at every seed, evaluate each at its ks, compare the runs; write OUT/results.json and report.md.

    Args:
        spec: the experiment (see `phds.experiment.spec`).
        out_dir: where every stage writes; re-running into it reuses finished stages.
        force: redo every stage.
        jobs: SFT runs trained and evaluated at the same time, each in its own process (small models on a
            many-core CPU gain most; 1 runs everything in this process).
        threads: torch threads per run (default: torch's, divided among the jobs).
        say: where progress lines go (the CLI passes rich's console.print); default: logging.
        command: the command line that ran the experiment, recorded in the results.

    Returns:
        an `ExperimentResult`: the results (schema in docs/experiments.md), report path, summary lines.

    Example: `run_experiment(load_spec("exp.toml", "runs/exp"), "runs/exp")`.
    """
    from phds.experiment.analysis import analyse
    from phds.experiment.report import summary_lines, write_report

    out = Path(out_dir)
    say = say or (lambda text: logger.info(text))
    if jobs < 1:
        raise ValueError(f"`jobs` must be >= 1, got {jobs}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"`out_dir` {str(out)!r} is a file; choose a folder")
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    _declare(spec, out, force)
    stages = Stages(out, force)
    previous_threads = torch.get_num_threads()
    per_job_threads = threads or max(1, previous_threads // jobs)
    torch.set_num_threads(threads or previous_threads)  # pretraining runs alone: every core it is given
    try:
        _make_data(spec, out, stages, say)
        base_dir, base_settings = _base_model(spec, out, stages, say)
        the_plan = plan(spec, _k_pre(base_dir))
        torch.set_num_threads(per_job_threads)
        _train_and_evaluate(spec, the_plan, out, base_dir, base_settings, stages, say, jobs, per_job_threads)
    except BaseException:
        # the stages it finished are kept and reused, so what they cost counts too
        _add_compute_time(out, time.perf_counter() - started, command, failed=True)
        raise
    finally:
        torch.set_num_threads(previous_threads)
    say("[bold]analysis[/]: run-level comparisons against the declared margins")
    results = analyse(spec, the_plan, out)
    seconds = time.perf_counter() - started
    results["provenance"] = _provenance(command, seconds, stages, jobs, per_job_threads)
    results["provenance"]["minutes_to_compute"] = _add_compute_time(out, seconds if stages.ran else 0.0, command)
    (out / RESULTS_NAME).write_text(json.dumps(results, indent=1) + "\n")
    summary = summary_lines(results)
    report = write_report(results, out)
    for line in summary:
        say(line)
    say(f"report: {report}")
    return ExperimentResult(out, results, report, summary, stages.ran, stages.reused)


def _declare(spec: ExperimentSpec, out: Path, force: bool) -> None:
    """Write the spec before anything runs; refuse to change how runs are judged once any run exists."""
    path = out / SPEC_NAME
    declared = spec.to_dict()
    if path.is_file() and not force:
        earlier = json.loads(path.read_text())
        changed = [key for key in JUDGING if earlier["spec"].get(key) != _jsonable(declared[key])]
        if changed and any((out / "runs").glob("*/seed*/stage.json")):
            what = ", ".join(f"{key}={earlier['spec'].get(key)!r}" for key in changed)
            raise ValueError(
                f"{path} declared {what} before its runs; "
                "judging rules cannot change after results exist: use a new output folder (or --force to redo all)"
            )
        if not changed:  # the same judging rules: keep when they were declared, record the rest as it is now
            path.write_text(
                json.dumps({"declared": earlier["declared"], "spec": _jsonable(declared)}, indent=1) + "\n"
            )
            return
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    path.write_text(json.dumps({"declared": stamp, "spec": _jsonable(declared)}, indent=1) + "\n")


def _make_data(spec: ExperimentSpec, out: Path, stages: Stages, say: Callable[[str], None]) -> None:
    data = spec.data
    if data.generator is None:
        return
    settings = {"generator": data.generator, "options": data.options}
    if stages.done("data", settings):
        return
    say(f"[bold]data[/]: {data.generator} generator")
    folder = stages.start("data", settings)
    if data.generator == "demo":
        from phds.demo_data import make_demo_data

        generated = make_demo_data(**data.options)
        generated.write(folder)
        # The base model knows the raw format ("REV abc= cba"), not the SFT one: the same items, raw.
        _write_jsonl(folder / "base_mc.jsonl", [{**i, "query": i["body"] + "="} for i in generated.eval_mc])
        _write_jsonl(folder / "base_em.jsonl", [{**i, "prompt": i["body"] + "="} for i in generated.eval_em])
    else:  # holdout: the last share of a text's lines is held out for evaluation, never trained on
        options = dict(data.options)
        source, name = Path(options.pop("source")), options.pop("name")
        held_out = float(options.pop("held_out", 0.1))
        if options:
            raise ValueError(
                f"the holdout generator takes `source`, `name` and `held_out`, got also {sorted(options)}"
            )
        lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
        cut = int(len(lines) * (1 - held_out))
        (folder / f"{name}_train.txt").write_text("".join(lines[:cut]), encoding="utf-8")
        (folder / f"{name}.txt").write_text("".join(lines[cut:]), encoding="utf-8")
    stages.finish("data", settings)


def _base_model(spec: ExperimentSpec, out: Path, stages: Stages, say: Callable[[str], None]) -> tuple[str, dict]:
    if spec.pretrain is None:
        return spec.base_model, {"model": spec.base_model}
    from phds import dial, training
    from phds.experiment.pretrain import fresh_model, pretrain_config, pretrain_tokenizer

    pretrain = spec.pretrain
    settings = {"pretrain": _jsonable(pretrain.__dict__)}
    base_dir = out / "base" / "model"
    if not stages.done("base", settings):
        say(f"[bold]base[/]: pretraining a {pretrain.architecture} MoE from scratch for {pretrain.steps} steps")
        stages.start("base", settings)
        tokenizer = pretrain_tokenizer(pretrain)
        model = fresh_model(pretrain, tokenizer)
        result = training.train(
            model,
            pretrain_config(pretrain, base_dir, k_pre=dial.k_pre(model)),
            train_data=pretrain.data,
            tokenizer=tokenizer,
        )
        _mark_base(base_dir)
        stages.finish("base", settings, train_loss=result.train_loss, steps=result.global_step)
    return str(base_dir), settings


def _mark_base(base_dir: Path) -> None:
    """A pretrained model is a plain MoE, not a PHDS checkpoint: declare it as a base model at k_pre."""
    from phds.sidecar import Sidecar, read_sidecar, write_sidecar

    sidecar = read_sidecar(base_dir)
    write_sidecar(base_dir, Sidecar(ks=[sidecar.k_pre], k_pre=sidecar.k_pre, method="base", made_by=sidecar.made_by))


def _k_pre(base: str) -> int:
    """The base model's pretrained k, asked of the dial (its sidecar says it without loading the weights)."""
    from phds import dial
    from phds.loading import load
    from phds.sidecar import read_sidecar

    if Path(base).is_dir():
        sidecar = read_sidecar(base)
        if sidecar is not None:
            return sidecar.k_pre
    model, _ = load(base, device="cpu", tokenizer=False)
    return dial.k_pre(model)


# ----------------------------------------------------------------------------------------------------------------------
# training and evaluation jobs


@dataclass
class Job:
    """One unit of work a worker process can do alone: train a run at a seed (if needed), then evaluate it."""

    name: str
    train: dict[str, Any] | None  # keywords of _train_one, or None when the model exists
    evaluations: list[dict[str, Any]]  # keywords of _evaluate_one


def _train_and_evaluate(spec, the_plan, out, base_dir, base_settings, stages, say, jobs, threads) -> None:
    work: list[Job] = []
    generated = _generated_data_settings(out)  # read once: every stage's settings include it
    data_settings = {"train": spec.data.train, "valid": spec.data.valid, "data": generated}
    for run in the_plan.runs.values():
        for seed in spec.seeds:
            stage = f"runs/{run.name}/seed{seed}"
            train_settings = {
                "base": base_settings,
                "data": data_settings,
                "training": spec.training,
                "run": run.fields,
                "seed": seed,
            }
            train = None
            if not stages.done(stage, train_settings):
                stages.start(stage, train_settings)  # note: resumes an interrupted attempt with the same settings
                train = dict(stage=stage, settings=train_settings, base=base_dir, seed=seed, fields=run.fields)
            evaluations = _pending_evaluations(
                spec, the_plan, stages, run.name, seed, train_settings, train, generated
            )
            stages.ran.extend(evaluation["stage"] for evaluation in evaluations)
            if train is not None or evaluations:
                work.append(Job(f"{run.name} seed {seed}", train, evaluations))
    base_evals = _pending_evaluations(spec, the_plan, stages, None, None, base_settings, None, generated)
    stages.ran.extend(evaluation["stage"] for evaluation in base_evals)
    if base_evals:
        work.append(Job("base model", None, base_evals))
    if not work:
        say("every run and evaluation is done already; re-analysing")
        return
    say(f"[bold]runs[/]: {len(work)} jobs ({sum(j.train is not None for j in work)} SFT runs), {jobs} at a time")
    common = dict(out=str(out), spec=spec.to_dict(), threads=threads)
    if jobs == 1:
        for index, job in enumerate(work, 1):
            say(f"  [{index}/{len(work)}] {job.name}")
            _do_job(job, **common)
        return
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked torch thread pools
    started = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(_do_job, job, quiet=True, **common): job for job in work}
        try:
            for index, future in enumerate(concurrent.futures.as_completed(futures), 1):
                future.result()  # a failed job fails the experiment, with the worker's exception
                elapsed = time.perf_counter() - started
                left = elapsed / index * (len(work) - index)
                name = futures[future].name
                say(f"  [{index}/{len(work)}] done: {name}  ({elapsed / 60:.1f} min, ~{left / 60:.1f} left)")
        except BaseException:
            for future in futures:  # jobs not started never start; running ones finish (their stages are kept)
                future.cancel()
            raise


def _pending_evaluations(spec, the_plan, stages, run, seed, model_settings, train, generated) -> list[dict[str, Any]]:
    pending = []
    for evaluation in the_plan.evaluations.values():
        if evaluation.run != run or evaluation.seed != seed:
            continue
        stage = f"eval/{evaluation.folder}"
        settings = {
            "model": model_settings,
            "ks": evaluation.ks,
            "tasks": evaluation.tasks,
            "evaluation": spec.evaluation,
            "data": generated,
        }
        if evaluation.policy is not None:
            settings.update(policy=evaluation.policy, calibration=CALIBRATION)
        if train is None and stages.done(stage, settings):
            continue
        model = f"runs/{run}/seed{seed}/model" if run is not None else None
        pending.append(
            dict(
                stage=stage,
                settings=settings,
                model=model,
                ks=evaluation.ks,
                tasks=evaluation.tasks,
                policy=evaluation.policy,
            )
        )
    return pending


def _do_job(job: Job, *, out: str, spec: dict[str, Any], threads: int, quiet: bool = False) -> None:
    """Run one job (in this process or a worker): train if asked, then every evaluation of the model."""
    torch.set_num_threads(threads)
    if quiet:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    stages = Stages(Path(out), force=False)
    log = stages.out / "logs" / (job.name.replace(" ", "-") + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    # A worker's Trainer and evaluation print as they go; beside other workers that is noise, so it goes to a file.
    with open(log, "a") if quiet else contextlib.nullcontext() as sink:
        with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
            with contextlib.redirect_stderr(sink) if quiet else contextlib.nullcontext():
                if job.train is not None:
                    _train_one(stages, spec, quiet=quiet, **job.train)
                for evaluation in job.evaluations:
                    _evaluate_one(stages, spec, quiet=quiet, **evaluation)


def _train_one(stages: Stages, spec: dict, *, stage, settings, base, seed, fields, quiet) -> None:
    from phds import training

    folder = stages.out / stage
    config = training.PHDSConfig(
        **{"disable_tqdm": quiet, **spec["training"], **fields},
        output_dir=str(folder / "model"),
        seed=seed,
        resume_from_checkpoint=True if (folder / "model" / "checkpoints").is_dir() else None,
    )
    result = training.train(base, config, train_data=spec["data"]["train"], eval_data=spec["data"]["valid"])
    stages.finish(
        stage,
        settings,
        selected_step=result.best_step,
        steps=result.global_step,
        validation_loss={str(k): v for k, v in result.validation_loss.items()},
        train_loss=result.train_loss,
    )


def _evaluate_one(stages: Stages, spec: dict, *, stage, settings, model, ks, tasks, policy, quiet) -> None:
    from phds import evaluation
    from phds.loading import load

    folder = stages.start(stage, settings)
    options = dict(spec["evaluation"])
    implementation = options.pop("experts_implementation", None)
    path = stages.out / model if model is not None else _base_path(stages.out, spec)
    loaded = load(path, device=options.pop("device", "cpu"), experts_implementation=implementation)
    calibrated = _calibrate(loaded, policy, ks, spec["data"]["valid"], quiet) if policy is not None else None
    points = [entry["policy"] for entry in calibrated.values()] if calibrated is not None else ks
    results = evaluation.evaluate(
        loaded, points, tasks, out_dir=folder, latency=options.pop("latency", False), progress=not quiet, **options
    )
    if calibrated is not None:
        # the analysis reads a budget's scores under the label of the policy calibrated to it
        results["calibration"] = {
            str(budget): {**entry, "policy": str(entry["policy"])} for budget, entry in calibrated.items()
        }
        from phds.evaluation.report import dumps_results

        (folder / "results.json").write_text(dumps_results(results))
    stages.finish(stage, settings)


# How a policy arm is calibrated: on the first rows of the validation split, never on evaluation items.
CALIBRATION = {"rows": 256, "max_length": 128, "tolerance": 0.01}


def _calibrate(loaded, policy: str, budgets: list[int], valid: str, quiet: bool) -> dict[int, dict[str, Any]]:
    from phds.calibration import calibrate

    model, tokenizer = loaded
    calibrated = {}
    for budget in budgets:
        result = calibrate(
            model,
            policy,
            target=budget,
            data=valid,
            tokenizer=tokenizer,
            max_rows=CALIBRATION["rows"],
            max_length=CALIBRATION["max_length"],
            tolerance=CALIBRATION["tolerance"],
            progress=not quiet,
        )
        calibrated[budget] = {"policy": result.policy, "target": result.target, "calibration_mean": result.measured}
    return calibrated


def _base_path(out: Path, spec: dict) -> str:
    return str(out / "base" / "model") if spec["pretrain"] is not None else spec["base_model"]


def _generated_data_settings(out: Path) -> dict[str, Any] | None:
    """The generated data's settings (so a change of generated data invalidates what was trained on it)."""
    marker = out / "data" / "stage.json"
    return json.loads(marker.read_text())["settings"] if marker.is_file() else None


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _add_compute_time(out: Path, seconds: float, command: str | None, failed: bool = False) -> float:
    """Wall minutes of every invocation that ran a stage, summed in OUT/timing.json (a re-analysis adds nothing; a
    failed invocation counts, since the stages it finished are reused), so the results say what computing them cost,
    not what the last re-run cost."""
    path = out / "timing.json"
    timing = json.loads(path.read_text()) if path.is_file() else {"invocations": []}
    if seconds:
        entry = {"command": command, "minutes": round(seconds / 60, 2)}
        timing["invocations"].append({**entry, "failed": True} if failed else entry)
        path.write_text(json.dumps(timing, indent=1) + "\n")
    return round(sum(entry["minutes"] for entry in timing["invocations"]), 2)


def _provenance(command, seconds, stages, jobs, threads) -> dict[str, Any]:
    import importlib.metadata
    import os
    import platform

    packages = ("moe-phds", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "numpy", "scipy")
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "command": command,
        "versions": {**versions, "python": platform.python_version()},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "jobs": jobs,
        "threads_per_job": threads,
        "minutes_this_invocation": round(seconds / 60, 2),
        "stages_run": len(stages.ran),
        "stages_reused": len(stages.reused),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
