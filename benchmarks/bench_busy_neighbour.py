"""Decode beside a busy process: do the thread count and OpenMP wait policy `phds serve` chooses prevent stalls?

Each contender runs in a process of its own (libgomp reads its wait policy when torch is imported), builds the model,
warms its engine up (compiling it when asked), then decodes one request twice: on the idle machine, and again while
this script runs one busy process beside it (a Python loop: a second job, or a tokenizer). Every decode step is
timed. Contenders, for the eager and the compiled engine:

- `torch defaults`: torch's thread count (every core) and libgomp's wait policy, what a plain script gets;
- `phds`: what `phds serve` chooses (`phds.engine.threads`): an adaptive thread count (the compiled engine: the
  count at start-up) and `GOMP_SPINCOUNT=3000`.

Reports per contender and phase the median, 99th-percentile and slowest step, and the busy phase's median over the
idle one. A step is a stall when it takes more than 3x the contender's idle median. Writes
`benchmarks/results/busy_neighbour.json`; `--render docs/performance.md` rewrites the section between
`<!-- results:busy-neighbour -->` and `<!-- /results:busy-neighbour -->` from it.

Run: `python benchmarks/bench_busy_neighbour.py [--tiny-config olmoe-1b-7b-shape] [--k 2] [--steps 64]` (about
6 minutes at the default shape on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_llamacpp import ROOT, git_state, machine, write_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MARKERS = ("<!-- results:busy-neighbour -->", "<!-- /results:busy-neighbour -->")
STALL = 3.0  # a step slower than this many idle medians
CONTENDERS = {
    "torch defaults": {"policy": False},
    "phds": {"policy": True},
}
PACKAGES = ("torch", "transformers")


def worker(args) -> None:
    """One contender (run as `--worker`): warm up, print "ready", then per line of stdin ("idle" / "busy") decode
    `args.steps` tokens and print the step times as JSON."""
    import torch

    from phds.bench import BenchConfig, build_model
    from phds.bench.measure import random_prompts
    from phds.engine import Engine, Request, SamplingParams
    from phds.engine.threads import ThreadPolicy, describe_wait_policy

    policy = ThreadPolicy(adaptive=not args.compile) if args.policy else None
    model = build_model(BenchConfig(tiny_config=args.tiny_config))
    engine = Engine(model, max_batch_size=1, max_seq_len=2 * args.steps + 80, compile=args.compile, threads=policy)
    prompt = random_prompts(BenchConfig(prompt_len=32), 1, model.config.vocab_size)[0].tolist()
    engine.generate([prompt], args.k, SamplingParams(max_new_tokens=4, ignore_eos=True))  # compiles when asked
    print(json.dumps({"ready": True, "wait_policy": describe_wait_policy()}), flush=True)
    for phase in sys.stdin:
        params = SamplingParams(max_new_tokens=args.steps + 1, ignore_eos=True)
        engine.add(Request(request_id=phase.strip(), prompt_ids=prompt, k=args.k, params=params))
        engine.step()  # prefill
        steps, threads = [], []
        while engine.has_work():
            start = time.perf_counter()
            engine.step()
            steps.append((time.perf_counter() - start) * 1e3)
            threads.append(torch.get_num_threads())
        print(json.dumps({"steps_ms": steps, "threads": threads}), flush=True)


def contend(args, name: str, compiled: bool) -> dict:
    environ = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if CONTENDERS[name]["policy"]:
        from phds.engine.threads import wait_policy_env

        environ.update(wait_policy_env(environ))
    command = [sys.executable, __file__, "--worker", "--tiny-config", args.tiny_config, "--k", str(args.k)]
    command += ["--steps", str(args.steps)] + ["--compile"] * compiled + ["--policy"] * CONTENDERS[name]["policy"]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environ) as process:
        ready = json.loads(process.stdout.readline())
        record = {"wait_policy": ready["wait_policy"]}
        for phase in ("idle", "busy"):
            neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if phase == "busy" else None
            try:
                process.stdin.write(phase + "\n")
                process.stdin.flush()
                record[phase] = json.loads(process.stdout.readline())
            finally:
                if neighbour is not None:
                    neighbour.kill()
                    neighbour.wait()
        process.stdin.close()
    idle_median = statistics.median(record["idle"]["steps_ms"])
    for phase in ("idle", "busy"):
        steps = sorted(record[phase]["steps_ms"])
        record[phase].update(
            median_ms=statistics.median(steps),
            p99_ms=steps[min(len(steps) - 1, round(0.99 * (len(steps) - 1)))],
            max_ms=steps[-1],
            stalls=sum(step > STALL * idle_median for step in steps),
            threads_used=sorted(set(record[phase]["threads"])),
        )
    record["busy_over_idle"] = record["busy"]["median_ms"] / idle_median
    print(
        f"{'compiled' if compiled else 'eager'} engine, {name}: idle {idle_median:.1f} ms, beside a busy process "
        f"{record['busy']['median_ms']:.1f} ms (p99 {record['busy']['p99_ms']:.1f}, max {record['busy']['max_ms']:.1f},"
        f" {record['busy']['stalls']} stalls); threads idle {record['idle']['threads_used']}, busy"
        f" {record['busy']['threads_used']}",
        flush=True,
    )
    return record


def measure(args) -> dict:
    results = {
        "preset": args.tiny_config,
        "k": args.k,
        "steps": args.steps,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "versions": {name: importlib.metadata.version(name) for name in ("moe-phds", *PACKAGES)},
        "git": git_state(),
        "runs": {},
    }
    for compiled in (False, True):
        for name in CONTENDERS:
            results["runs"][f"{'compiled' if compiled else 'eager'} engine, {name}"] = contend(args, name, compiled)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return results


def render(results: dict, source: str) -> str:
    lines = [
        f"Rendered from `{source}` by `benchmarks/bench_busy_neighbour.py --render` (run {results['started']} to "
        f"{results['finished']}; {results['machine']['cpu']}, {results['machine']['cores']} cores). "
        f"`{results['preset']}`, k={results['k']}, batch 1, {results['steps']} decode steps per phase; the busy "
        f"process is a Python loop started when the phase starts. A stall is a step over {STALL:g}x the idle median.",
        "",
        "| engine, threads and wait policy | threads beside the busy process | idle median ms | busy median ms "
        "| busy p99 ms | busy max ms | stalls | busy / idle |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in results["runs"].items():
        idle, busy = run["idle"], run["busy"]
        lines.append(
            f"| {name} ({run['wait_policy']}) | {', '.join(map(str, busy['threads_used']))} | {idle['median_ms']:.1f} "
            f"| {busy['median_ms']:.1f} | {busy['p99_ms']:.1f} | {busy['max_ms']:.1f} | {busy['stalls']} "
            f"| {run['busy_over_idle']:.2f}x |"
        )
    versions = ", ".join(f"{name} {version}" for name, version in results["versions"].items())
    modified = results["git"]["modified"]
    lines += [
        "",
        f"Versions: {versions}. Commit {results['git']['commit'][:7]}"
        + (f", with uncommitted changes to {', '.join(modified)}." if modified else "."),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-config", default="olmoe-1b-7b-shape", help="phds bench preset or family spec")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per phase")
    parser.add_argument("--out", type=Path, default=RESULTS / "busy_neighbour.json")
    parser.add_argument("--render", type=Path, default=None, help="rewrite this Markdown file's section and stop")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--policy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
    elif args.render is not None:
        results = json.loads(args.out.read_text())
        write_section(args.render, render(results, str(args.out.relative_to(ROOT))), MARKERS)
        print(f"rewrote the busy-neighbour section of {args.render}")
    else:
        results = measure(args)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
