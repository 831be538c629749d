"""An experiment's report: report.md (verdict tables, scores per seed, agreement, runs) and frontier.png.

Everything here is rendered from the analysis' results (never typed), so the README can render the same tables
from a committed results.json (`markdown_tables`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phds.experiment.stats import VERDICTS

REPORT_NAME = "report.md"
FRONTIER_NAME = "frontier.png"


def _num(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return text.replace("-", "−")


def _interval(entry: dict[str, Any], digits: int = 3, signed: bool = True) -> str:
    return f"[{_num(entry['low'], digits, signed)}, {_num(entry['high'], digits, signed)}]"


def _digits(metric: str) -> int:
    return 1 if metric == "ppl" else 3


def verdict_table(results: dict[str, Any], task_name: str) -> list[str]:
    """Per k and baseline: the reference's mean difference over seeds, its interval and the verdict."""
    task = results["tasks"][task_name]
    reference = results["reference"]
    metric = task["metric"]
    others = list(dict.fromkeys(c["other"] for c in task["comparisons"]))
    lines = [
        f"| k | {reference} | " + " | ".join(f"vs {o}" for o in others) + " |",
        "|---|---|" + "---|" * len(others),
    ]
    scale = " (log ppl)" if metric == "ppl" else ""
    for k in sorted({c["k"] for c in task["comparisons"]}):
        cells = []
        for other in others:
            match = [c for c in task["comparisons"] if c["k"] == k and c["other"] == other]
            if not match:
                cells.append("—")
                continue
            c = match[0]
            cells.append(f"Δ {_num(c['mean'], 3, True)}{scale} {_interval(c)} **{c['verdict']}**")
        score = task["scores"][reference][str(k)]
        lines.append(f"| {k} | {_num(score['mean'], _digits(metric))} | " + " | ".join(cells) + " |")
    return lines


def scores_table(results: dict[str, Any], task_name: str) -> list[str]:
    """Mean ± SD over seeds of every arm at every k it was evaluated at."""
    task = results["tasks"][task_name]
    digits = _digits(task["metric"])
    ks = results["ks"]
    lines = ["| arm | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for arm, by_k in task["scores"].items():
        cells = []
        for k in ks:
            score = by_k.get(str(k))
            if score is None:
                cells.append("—")
            else:
                sd = "" if score["sd"] is None else f" ± {_num(score['sd'], digits)}"
                cells.append(f"{_num(score['mean'], digits)}{sd}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def ranking_table(results: dict[str, Any], task_name: str) -> list[str]:
    """Per budget k: every arm ranked by its mean score, with the compute it measured (routed experts per token,
    active parameters; tokens and seconds per answer for generation) and its run-level verdict against the
    reference. A policy arm's k is the budget it was calibrated to on the validation split; its measured experts on
    the task can differ."""
    task = results["tasks"][task_name]
    reference = results["reference"]
    digits = _digits(task["metric"])
    computes = [score.get("compute", {}) for by_k in task["scores"].values() for score in by_k.values()]
    measured = any("active_experts" in c for c in computes)  # results made before compute was recorded have none
    generation = any("tokens_per_answer" in c for c in computes)
    columns = (["experts/token", "active params"] if measured else []) + (
        ["tokens/answer", "s/answer"] if generation else []
    )
    header = ["k", "rank", "arm", task["metric"], *columns, f"vs {reference}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    verdicts = {(c["k"], c["other"]): c for c in task["comparisons"]}
    for k in results["ks"]:
        entries = [(arm, by_k[str(k)]) for arm, by_k in task["scores"].items() if str(k) in by_k]
        entries.sort(key=lambda e: e[1]["mean"], reverse=task["higher_is_better"])
        for rank, (arm, score) in enumerate(entries, 1):
            compute = score.get("compute", {})
            params = compute.get("active_params")
            cells = [str(k), str(rank), arm, _num(score["mean"], digits)]
            if measured:
                cells += [_num(compute.get("active_experts"), 2), "n/a" if params is None else f"{params:,.0f}"]
            if generation:
                cells += [_num(compute.get("tokens_per_answer"), 1), _num(compute.get("seconds_per_answer"), 3)]
            c = verdicts.get((k, arm))
            cells.append("(reference)" if arm == reference else (f"{c['verdict']}" if c else "—"))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def agreement_table(results: dict[str, Any], task_name: str) -> list[str]:
    """Self-agreement across k per single-checkpoint arm, the reference's paired difference, and the oracles'
    cross-k agreement beside its same-k different-seed floor."""
    agreement = results["tasks"][task_name]["agreement"]
    reference = results["reference"]
    lines = ["| what | mean | interval |", "|---|---|---|"]
    for arm, entry in agreement["self"].items():
        lines.append(f"| {arm}: one run, across its ks | {_num(entry['mean'])} | {_interval(entry, signed=False)} |")
    for arm, diff in agreement["reference_vs"].items():
        told = {"better": "higher", "worse": "lower"}.get(diff["verdict"], "inconclusive")
        lines.append(
            f"| {reference} − {arm} (paired by seed) | {_num(diff['mean'], 3, True)} | {_interval(diff)} **{told}** |"
        )
    if "oracles_cross_k" in agreement:
        entry = agreement["oracles_cross_k"]
        lines.append(
            f"| oracles across k, same seed (oracle-k at k vs oracle-k′ at k′) | {_num(entry['mean'])} | "
            f"{_interval(entry, signed=False)} |"
        )
    if "oracles_cross_k_other_seeds" in agreement:
        entry = agreement["oracles_cross_k_other_seeds"]
        lines.append(
            f"| oracles across k and seeds (oracle-k seed s vs oracle-k′ seed t) | {_num(entry['mean'])} | "
            f"{_interval(entry, signed=False)} |"
        )
    if "oracles_same_k_floor" in agreement:
        entry = agreement["oracles_same_k_floor"]
        lines.append(
            f"| oracles at the same k, different seeds (floor) | {_num(entry['mean'])} | "
            f"{_interval(entry, signed=False)} |"
        )
    if reference in agreement.get("same_k_floor", {}):
        entry = agreement["same_k_floor"][reference]
        lines.append(
            f"| {reference} at the same k, different seeds | {_num(entry['mean'])} | {_interval(entry, signed=False)} |"
        )
    return lines


def verdict_counts(results: dict[str, Any]) -> dict[str, dict[str, int]]:
    """How many (task, k) comparisons against each baseline arm ended in each verdict."""
    counts: dict[str, dict[str, int]] = {}
    for task in results["tasks"].values():
        for c in task["comparisons"]:
            counts.setdefault(c["other"], dict.fromkeys(VERDICTS, 0))[c["verdict"]] += 1
    return counts


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The short printed summary: verdicts per baseline, then the fair agreement comparison per task.

    Example: `for line in summary_lines(json.load(open("runs/exp/results.json"))): print(line)`.
    """
    reference = results["reference"]
    seeds = len(results["seeds"])
    lines = [
        f"{reference} vs each arm over {seeds} SFT seeds per arm, at every k (verdicts against the declared margin):"
    ]
    for other, counts in verdict_counts(results).items():
        told = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
        lines.append(f"  vs {other}: {told}")
    for name, task in results["tasks"].items():
        for arm, diff in task["agreement"]["reference_vs"].items():
            mine = task["agreement"]["self"][reference]["mean"]
            theirs = task["agreement"]["self"][arm]["mean"]
            lines.append(
                f"  {name} agreement across k: {reference} {mine:.3f} vs {arm} {theirs:.3f} "
                f"(Δ {_num(diff['mean'], 3, True)} {_interval(diff)})"
            )
    if seeds < 3:
        lines.append(f"  only {seeds} seed(s) per arm: indicative, not evidence")
    return lines


def markdown_summary(results: dict[str, Any]) -> list[str]:
    """The summary lines as a Markdown list (indented lines become nested items)."""
    return [("  - " if line.startswith("  ") else "- ") + line.strip() for line in summary_lines(results)]


def plot_frontier(results: dict[str, Any], path: Path) -> Path:
    """Mean primary metric over seeds vs the active parameters per token each arm measured (routed experts
    counted as used, shared experts, attention and embeddings included), one line per arm (the oracles joined into
    one line, each at its own k), every seed's run drawn as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["tasks"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 3.8), squeeze=False)
    lines_of = _frontier_lines(results)
    for ax, name in zip(axes[0], names, strict=True):
        task = results["tasks"][name]
        measured = all(
            "active_params" in score.get("compute", {}) for by_k in task["scores"].values() for score in by_k.values()
        )

        def x_of(arm: str, k: int, task=task, measured=measured) -> float:
            return task["scores"][arm][str(k)]["compute"]["active_params"] / 1e6 if measured else k

        for label, points in lines_of.items():
            xs = [x_of(arm, k) for k, arm in points]
            means = [task["scores"][arm][str(k)]["mean"] for k, arm in points]
            (line,) = ax.plot(xs, means, marker="o", label=label)
            for k, arm in points:
                per_seed = list(task["scores"][arm][str(k)]["per_seed"].values())
                ax.scatter([x_of(arm, k)] * len(per_seed), per_seed, s=9, alpha=0.45, color=line.get_color())
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("active parameters per token, measured (M)" if measured else "experts per token k")
        if not measured:
            ax.set_xticks(results["ks"])
        better = "higher" if task["higher_is_better"] else "lower"
        ax.set_ylabel(f"{task['metric']} ({better} is better)")
        if task["metric"] == "ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(5, len(labels)), fontsize=9)
    fig.suptitle(f"mean over {len(results['seeds'])} seeds (dots: single runs)", y=0.02, va="bottom", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.93))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _frontier_lines(results: dict[str, Any]) -> dict[str, list[tuple[int, str]]]:
    lines: dict[str, list[tuple[int, str]]] = {}
    for arm in results["arms"]:
        label = "oracles (one per k)" if arm["kind"] == "oracle" else arm["name"]
        lines.setdefault(label, []).extend((k, arm["name"]) for k in arm["ks"])
    return {label: sorted(points) for label, points in lines.items()}


def runs_table(results: dict[str, Any]) -> list[str]:
    """The step each run's checkpoint rule chose, per seed."""
    seeds = results["seeds"]
    lines = ["| run | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for name, run in results["runs"].items():
        cells = [f"{run['seeds'][str(s)]['selected_step']} of {run['seeds'][str(s)]['steps']}" for s in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown_tables(results: dict[str, Any]) -> str:
    """Every task's verdict, score and agreement tables as Markdown (what report.md and the README show)."""
    parts = []
    for name, task in results["tasks"].items():
        margin = task["comparisons"][0]["margin"] if task["comparisons"] else 0.0
        parts += [
            f"**{name}** ({task['metric']}, n = {task['n']} items; margin {margin:g}"
            + (" in log perplexity" if task["metric"] == "ppl" else "")
            + ")",
            "",
            *verdict_table(results, name),
            "",
            *scores_table(results, name),
            "",
            *agreement_table(results, name),
            "",
            "Ranked per budget (mean over seeds; compute as measured on this task):",
            "",
            *ranking_table(results, name),
            "",
        ]
    return "\n".join(parts).rstrip() + "\n"


def write_report(results: dict[str, Any], out: Path) -> Path:
    """`out/report.md` and `out/frontier.png`."""
    plot_frontier(results, out / FRONTIER_NAME)
    spec = results["spec"]
    provenance = results.get("provenance", {})
    lines = [
        f"# Experiment: {results['name']}",
        "",
        results.get("description") or "",
        "",
        f"Declared {results['declared']} before any run: K = {results['ks']}, k_pre = {results['k_pre']}, seeds "
        f"{results['seeds']}, checkpoint rule **{spec['checkpoint']}**, statistics **{spec['statistics']}** "
        f"({spec['confidence']:.0%} intervals over runs), margins {spec['margin'] or 'none (0)'}; reference arm "
        f"**{results['reference']}**.",
        "",
        "Verdicts (Δ = reference minus arm, positive = reference better; interval over training runs): **better** "
        "the interval is above 0; **non-inferior** above −margin; **worse** below −margin; **inconclusive** "
        "otherwise.",
        "",
        "## Summary",
        "",
        *markdown_summary(results),
        "",
        "## Results per task",
        "",
        markdown_tables(results),
        f"![frontier]({FRONTIER_NAME})",
        "",
        "## Runs (checkpoint chosen by the rule)",
        "",
        *runs_table(results),
        "",
        "## Provenance",
        "",
        f"Command: `{provenance.get('command')}`  ",
        f"Versions: {provenance.get('versions')}  ",
        f"Machine: {provenance.get('machine')}; {provenance.get('jobs')} job(s) × "
        f"{provenance.get('threads_per_job')} thread(s); {provenance.get('minutes_to_compute')} min to compute, this "
        f"invocation {provenance.get('minutes_this_invocation')} "
        f"min ({provenance.get('stages_reused')} finished stages reused).",
        "",
    ]
    path = out / REPORT_NAME
    path.write_text("\n".join(lines))
    return path
