"""`evaluate`: one pass per operating point over every task, per-item predictions stored, agreement computed.

An operating point is a k, a routing policy or a per-layer allocation (`phds.points`). The model is loaded once;
each point is dialled with `phds.sparsity`, so the model's own k is restored afterwards, and every task records the
routed experts per token it measured at each point (a policy's depend on the text) and the active parameters that
implies. Tasks and points are validated before any model call.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import platform
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from phds import dial
from phds.evaluation import scoring
from phds.evaluation.agreement import agreement_matrix
from phds.evaluation.latency import LatencyConfig, measure_latency
from phds.evaluation.metrics import METRICS, METRICS_OF, PRIMARY, last_number, summarise
from phds.evaluation.prompts import ItemRequests, build_requests
from phds.evaluation.tasks import GENERATION_KINDS, Task, load_tasks, normalise_number
from phds.loading import load, sidecar_of
from phds.points import Point, is_policy, point_label
from phds.sidecar import check_ks, resolve_ks

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def resolve_model(model, tokenizer, device):
    if isinstance(model, (str, os.PathLike)):
        loaded, tok = load(str(model), device=device)
        return loaded, tokenizer if tokenizer is not None else tok, str(model)
    if isinstance(model, tuple):
        loaded, tok = model
        return loaded, tokenizer if tokenizer is not None else tok, None
    return model, tokenizer, None


def _windows(tokenizer, text: str, window: int, stride: int, limit: int | None) -> list[tuple[list[int], list[int]]]:
    """Sliding windows of `window` tokens every `stride` tokens; each scores only the tokens not scored before."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < 2:
        raise ValueError("a perplexity text needs at least 2 tokens")
    requests, scored_until = [], 1  # the first token has no context and is never scored
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        if end <= scored_until:
            break
        requests.append((ids[begin:scored_until], ids[scored_until:end]))
        scored_until = end
        if end == len(ids) or (limit is not None and len(requests) >= limit):
            break
    return requests


def _versions() -> dict[str, str]:
    import transformers

    import phds

    return {
        "phds": phds.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


class _Prepared:
    """A task's requests, tokenised once and reused at every k."""

    def __init__(self, task: Task, tokenizer, *, limit, num_fewshot, seed, max_len, ppl_stride):
        self.task = task
        self.count = len(task.items) if limit is None else min(limit, len(task.items))
        self.items: list[ItemRequests] = []
        self.token_requests: list[tuple[list[int], list[int]]] = []
        self.owner: list[int] = []  # item index of each token request
        if task.kind == "perplexity":
            stride = ppl_stride or max(max_len // 2, 1)
            if not 1 <= stride <= max_len:
                raise ValueError(f"`ppl_stride` must be in [1, {max_len}], got {ppl_stride}")
            self.stride = stride
            self.token_requests = _windows(tokenizer, task.items[0]["text"], max_len, stride, limit)
            self.owner = list(range(len(self.token_requests)))
            self.count = len(self.token_requests)
            return
        self.items = build_requests(task, self.count, num_fewshot=num_fewshot, seed=seed)
        for index, item in enumerate(self.items):
            for context, continuation in item.pairs:
                self.token_requests.append(scoring.encode_pair(tokenizer, context, continuation, max_len))
                self.owner.append(index)

    @property
    def units(self) -> int:
        return len(self.token_requests) if self.token_requests else self.count


def _score_ll(prep: _Prepared, scored: list[scoring.Scored], k: int | str) -> tuple[dict, list[dict]]:
    task, kind = prep.task, prep.task.kind
    columns: dict[str, list] = {"prediction": []}
    records = []
    if kind == "perplexity":
        columns.update(nll=[], tokens=[])
        for w, s in enumerate(scored):
            columns["nll"].append(-s.logprob)
            columns["tokens"].append(s.n_tokens)
            columns["prediction"].append(s.argmax)
            records.append(
                {"task": task.name, "k": k, "index": w, "nll": -s.logprob, "tokens": s.n_tokens, "top1": s.argmax}
            )
        return columns, records
    by_item: list[list[scoring.Scored]] = [[] for _ in prep.items]
    for owner, s in zip(prep.owner, scored, strict=True):
        by_item[owner].append(s)
    for index, (item, results) in enumerate(zip(prep.items, by_item, strict=True)):
        record = {"task": task.name, "k": k, "index": index, "line": task.line_numbers[index]}
        if kind == "lambada":
            s = results[0]
            columns.setdefault("acc", []).append(float(s.greedy))
            columns.setdefault("nll", []).append(-s.logprob)
            columns.setdefault("tokens", []).append(1)
            columns["prediction"].append(s.argmax)
            record.update(prediction=s.argmax, correct=s.greedy, logprob=s.logprob)
        else:
            logprobs = [s.logprob for s in results]
            lengths = [len(cont.encode("utf-8")) for _, cont in item.pairs]
            choice = int(np.argmax(logprobs))
            choice_norm = int(np.argmax([lp / n for lp, n in zip(logprobs, lengths, strict=True)]))
            columns.setdefault("acc", []).append(float(choice == item.gold))
            if kind == "mc":
                columns.setdefault("acc_norm", []).append(float(choice_norm == item.gold))
            columns["prediction"].append(choice)
            record.update(prediction=choice, prediction_norm=choice_norm, gold=item.gold, logprobs=logprobs)
        records.append(record)
    return columns, records


def _score_generation(prep: _Prepared, texts: list[str], k: int | str) -> tuple[dict, list[dict]]:
    columns: dict[str, list] = {"prediction": [], "exact_match": []}
    records = []
    for index, (item, text) in enumerate(zip(prep.items, texts, strict=True)):
        if prep.task.kind == "gsm8k":
            answer = last_number(text)
        else:
            answer = text.strip()
        gold = normalise_number(item.gold) if prep.task.kind == "gsm8k" else item.gold
        correct = answer is not None and answer == gold
        columns["prediction"].append(answer)
        columns["exact_match"].append(float(correct))
        records.append(
            {
                "task": prep.task.name,
                "k": k,
                "index": index,
                "line": prep.task.line_numbers[index],
                "generation": text,
                "prediction": answer,
                "gold": gold,
                "correct": correct,
            }
        )
    return columns, records


def evaluate(
    model,
    ks: Sequence[int | Point] | None,
    tasks: Sequence[str | os.PathLike] | str,
    *,
    out_dir: str | os.PathLike | None = None,
    tokenizer=None,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    seed: int = 0,
    latency: bool | LatencyConfig = True,
    model_name: str | None = None,
    max_length: int | None = None,
    ppl_stride: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a model at every k (or operating point) in `ks`: quality per task, agreement, latency; one pass each.

    Args:
        model: a checkpoint path, hub name, `tiny:<arch>`, a loaded `(model, tokenizer)` pair, or a model (then pass
            `tokenizer`).
        ks: the distinct ks to dial (`phds.sidecar.check_ks`), and any other operating points (`phds.points`):
            routing policies like `phds.TopP(0.7)` and per-layer allocations `{layer: k}`, evaluated after the ks;
            None means the sidecar's declared ks, else the model's k_pre.
        tasks: task specs: .jsonl / .txt paths or bare names in `$PHDS_DATA` (see `phds.evaluation.tasks`).
        out_dir: when given, write results.json, predictions.jsonl, report.md, frontier.png and agreement.png.
        tokenizer: overrides the loaded tokenizer.
        limit: first `limit` items per task (windows for perplexity).
        num_fewshot: few-shot examples per item, drawn from the same file with `seed`.
        batch_size: rows per forward / generate call; scores equal batch size 1's.
        max_new_tokens: greedy generation limit for gsm8k / exact-match tasks.
        seed: few-shot sampling and bootstrap seed.
        latency: measure latency per k (True, False or a `LatencyConfig`).
        model_name: the name shown in reports (defaults to the path / hub name).
        max_length: cap on tokens per sequence (default: the model's max_position_embeddings); also the
            perplexity window.
        ppl_stride: perplexity window stride (default max_length // 2: every token after the first window sees
            at least half a window of context).
        device: where to load a model given by name (default: CUDA when present).
        progress: show a rich progress bar.

    Returns:
        The results.json content (schema in docs/evaluation.md).

    Example: `phds.evaluation.evaluate("tiny:olmoe", [1, 2, 4], ["copa"], limit=20, out_dir="eval-out")`.
    """
    # plan: every argument checked, the model loaded and the ks settled before any forward
    plan = _plan(
        model,
        ks,
        tasks,
        tokenizer=tokenizer,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        latency=latency,
        max_length=max_length,
        device=device,
    )
    # build: each task's requests, tokenised once and reused at every k
    prepared = [
        _Prepared(
            task,
            plan.tokenizer,
            limit=limit,
            num_fewshot=num_fewshot,
            seed=seed,
            max_len=plan.max_len,
            ppl_stride=ppl_stride,
        )
        for task in plan.tasks
    ]
    # run: one pass per k
    per_k, usage, records, latency_table = _run(
        plan, prepared, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress
    )
    # finish: metrics with CIs, agreement across k, and the files
    results = _assemble(
        prepared,
        per_k,
        usage,
        plan,
        latency_table,
        model=plan.model,
        sidecar=plan.sidecar,
        name=model_name or plan.name or getattr(plan.model, "name_or_path", None) or type(plan.model).__name__,
        settings=dict(
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            seed=seed,
            max_length=plan.max_len,
        ),
    )
    if out_dir is not None:
        from phds.evaluation.report import write_outputs

        write_outputs(results, records, out_dir)
    return results


@dataclasses.dataclass
class _Plan:
    """What `evaluate` runs, resolved and validated before any model call."""

    model: Any
    tokenizer: Any
    name: str | None  # the path or hub name the model was loaded from
    sidecar: Any
    ks: list[int]
    points: dict[str, Point]  # label -> point: the ks first, then the other points as given
    tasks: list[Task]
    max_len: int
    latency: LatencyConfig | None


def _plan(
    model, ks, tasks, *, tokenizer, limit, num_fewshot, batch_size, max_new_tokens, latency, max_length, device
) -> _Plan:
    """Check the arguments, load the tasks and the model, and settle the ks, the sequence cap and latency."""
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if value < 1:
            raise ValueError(f"`{name}` must be >= 1, got {value}")
    if limit is not None and limit < 1:
        raise ValueError(f"`limit` must be >= 1, got {limit}")
    if num_fewshot < 0:
        raise ValueError(f"`num_fewshot` must be >= 0, got {num_fewshot}")
    task_list = load_tasks(tasks)
    model, tokenizer, loaded_name = resolve_model(model, tokenizer, device)
    if tokenizer is None:
        raise ValueError("`tokenizer` is required: the model came without one")
    sidecar = sidecar_of(model)
    others = [point for point in (ks or []) if not _is_k(point)]
    if ks is None:
        ks = resolve_ks(model)[0]
    else:
        ks = [point for point in ks if _is_k(point)]
        # raises for a model without MoE layers; the given ks must be distinct
        ks = check_ks(ks, num_experts=dial.num_experts(model)) if ks or not others else []
    points = {point_label(k): k for k in ks}
    for point in others:
        with dial.sparsity(model, point):  # a bad policy or allocation fails here, before any forward
            pass
        label = point_label(point)
        if label in points:
            raise ValueError(f"`ks` names the operating point {label} twice")
        points[label] = point
    if sidecar is not None:
        undeclared = [k for k in ks if k not in sidecar.ks]
        if undeclared:
            # Probing a base model or an oracle off its k is the point of a sweep; only a PHDS checkpoint promises
            # quality at its declared ks, so only there is an undeclared k worth a warning.
            log = logger.warning if sidecar.method == "phds" else logger.info
            log("ks %s are not among the checkpoint's declared ks %s", undeclared, sidecar.ks)
    max_len = scoring.max_length(model, max_length)
    latency_config = latency if isinstance(latency, LatencyConfig) else (LatencyConfig() if latency else None)
    if latency_config is not None:
        # a copy, so the caller's config is not changed
        fitted = max(1, min(latency_config.prompt_tokens, max_len - latency_config.new_tokens - 1))
        latency_config = dataclasses.replace(latency_config, prompt_tokens=fitted)
    return _Plan(
        model=model,
        tokenizer=tokenizer,
        name=loaded_name,
        sidecar=sidecar,
        ks=ks,
        points=points,
        tasks=task_list,
        max_len=max_len,
        latency=latency_config,
    )


def _run(
    plan: _Plan, prepared: list[_Prepared], *, batch_size: int, max_new_tokens: int, progress: bool
) -> tuple[dict[str, dict[str, dict]], dict[str, dict[str, dict]], list[dict], dict[str, dict]]:
    """One pass per point over every task (and latency there): per-point metric columns, the experts each task
    used, per-item records, latency."""
    model, pad = plan.model, scoring.pad_id(plan.tokenizer)
    per_k: dict[str, dict[str, dict]] = {label: {} for label in plan.points}
    usage: dict[str, dict[str, dict]] = {label: {} for label in plan.points}
    records: list[dict] = []
    latency_table: dict[str, dict] = {}
    total = len(plan.points) * sum(p.units for p in prepared)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not progress
    ) as bar:
        job = bar.add_task("eval", total=total)
        for label, point in plan.points.items():
            for prep in prepared:
                bar.update(job, description=f"k={label} {prep.task.name}")
                # dialled per task, so the experts a policy keeps are measured on this task alone
                with dial.sparsity(model, point):
                    start = time.perf_counter()
                    columns, recs = _score_task(
                        plan,
                        prep,
                        _record_key(label, point),
                        batch_size=batch_size,
                        max_new_tokens=max_new_tokens,
                        pad=pad,
                        advance=lambda n: bar.advance(job, n),
                    )
                    seconds = time.perf_counter() - start
                    usage[label][prep.task.name] = {"layers": dial.active_experts(model), "seconds": seconds}
                per_k[label][prep.task.name] = columns
                records.extend(recs)
            if plan.latency is not None:
                bar.update(job, description=f"k={label} latency")
                latency_table[label] = measure_latency(model, point, plan.latency)
    return per_k, usage, records, latency_table


def _is_k(point: Point) -> bool:
    """A plain k, as opposed to a routing policy or a per-layer allocation."""
    return not (isinstance(point, Mapping) or is_policy(point))


def _record_key(label: str, point: Point) -> int | str:
    """How predictions and agreement name a point: a k as its number (as they always have), any other by label."""
    return point if isinstance(point, int) else label


def _score_task(
    plan: _Plan, prep: _Prepared, label: int | str, *, batch_size: int, max_new_tokens: int, pad: int, advance
) -> tuple[dict, list[dict]]:
    """Score one task at the point the model is dialled to: greedy generations or log-likelihoods."""
    if prep.task.kind in GENERATION_KINDS:
        texts = scoring.generate(
            plan.model,
            plan.tokenizer,
            [i.prompt for i in prep.items],
            max_new_tokens=max_new_tokens,
            stops=prep.items[0].stops,
            batch_size=batch_size,
            limit=plan.max_len,
            on_batch=advance,
        )
        columns, records = _score_generation(prep, texts, label)
        # answer length: cutting k can make answers longer, which a per-token speed-up does not show
        columns["answer_tokens"] = [len(plan.tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
        return columns, records
    scored = scoring.loglikelihoods(plan.model, prep.token_requests, batch_size=batch_size, pad=pad, on_batch=advance)
    return _score_ll(prep, scored, label)


def _mean_active_params(tasks: dict[str, Any], label: str) -> float | int | None:
    """The active parameters at a point over all tasks (the same on every task for a k or an allocation)."""
    values = [task["compute"][label]["active_params"] for task in tasks.values()]
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean = sum(values) / len(values)
    return int(mean) if float(mean).is_integer() else mean


def _compute(model, usage: dict, prep: _Prepared, columns: dict[str, list]) -> dict[str, float]:
    """What one task cost at one point: routed experts per token (measured), active parameters, and for
    generation tasks the tokens and seconds per answer (the pass's wall time over its items)."""
    layers = {int(index): mean for index, mean in usage["layers"].items() if mean is not None}
    mean = sum(layers.values()) / len(layers) if layers else None
    cost: dict[str, float] = {
        "active_experts": mean,
        "active_params": float(dial.active_parameters(model, layers)) if layers else None,
    }
    if prep.task.kind in GENERATION_KINDS:
        cost["seconds_per_answer"] = usage["seconds"] / max(prep.count, 1)
        cost["tokens_per_answer"] = float(np.mean(columns["answer_tokens"]))
    return cost


def _assemble(prepared, per_k, usage, plan, latency_table, *, model, sidecar, name, settings) -> dict[str, Any]:
    seed = settings["seed"]
    ks, labels = plan.ks, list(plan.points)
    tasks: dict[str, Any] = {}
    for prep in prepared:
        task = prep.task
        names = METRICS_OF[task.kind]
        entry: dict[str, Any] = {
            "kind": task.kind,
            "path": str(task.path),
            "n": prep.count,
            "primary": PRIMARY[task.kind],
            "higher_is_better": METRICS[PRIMARY[task.kind]],
            "metrics": {},
            "items": {},
            "compute": {},
        }
        if task.kind == "perplexity":
            entry["window"] = settings["max_length"]
            entry["stride"] = prep.stride
            entry["digest"] = Task(
                name=task.name,
                kind=task.kind,
                path=task.path,
                items=[{"ids": [r[0] + r[1] for r in prep.token_requests]}],
            ).digest()
        else:
            entry["digest"] = Task(
                name=task.name, kind=task.kind, path=task.path, items=task.items[: prep.count]
            ).digest()
        for label in labels:
            columns = per_k[label][task.name]
            entry["metrics"][label] = {m: summarise(m, columns, seed=seed) for m in names}
            entry["items"][label] = columns
            entry["compute"][label] = _compute(model, usage[label][task.name], prep, columns)
        entry["agreement"] = agreement_matrix(
            {_record_key(label, point): per_k[label][task.name]["prediction"] for label, point in plan.points.items()},
            positionwise=task.kind == "perplexity",
        )
        tasks[task.name] = entry
    return {
        "schema_version": SCHEMA_VERSION,
        "model": name,
        "method": sidecar.method if sidecar is not None else "base",
        "sidecar": sidecar.to_dict() if sidecar is not None else None,
        "ks": list(ks),
        "points": labels,
        "k_pre": dial.k_pre(model),
        "num_experts": dial.num_experts(model),
        "total_params": int(sum(p.numel() for p in model.parameters())),
        "active_params": {label: _mean_active_params(tasks, label) for label in labels},
        "settings": settings,
        "tasks": tasks,
        "latency": latency_table,
        "device": str(next(model.parameters()).device),
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
