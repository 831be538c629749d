"""Real-scale speed: the `olmoe-1b-7b-shape` preset (OLMoE-1B-7B's layer shapes, 8 layers, bf16, 3.56B random
parameters) decoded by the `phds` engine, stock transformers and llama.cpp, from one run, as ratios.

1. llama.cpp is built from the `llama-cpp-python` source distribution, which vendors it (`pip download`; cmake,
   `llama-bench` only, `nice -n 19`, 2 jobs: about 15 minutes), into `.bench-cache/` (git-ignored), and reused.
   It is a benchmark-only dependency: nothing in the package or its tests needs it.
2. The preset's weights are saved as a Hugging Face checkpoint (safetensors, in a child process so that its memory
   is returned) and converted with llama.cpp's own `convert_hf_to_gguf.py --outtype bf16`; the safetensors are
   deleted after, the GGUF is kept in `.bench-cache/` and reused. A random model has no tokenizer: the checkpoint
   gets a synthetic byte-level BPE of the preset's 50304 tokens, and the converter is told its pre-tokenizer is
   OLMoE's ("olmo"; it recognises tokenizers by hashing their output on a test text). Timings use random token ids.
3. `llama-bench` times batch-1 decode (tg 32 tokens after a 64-token context) and prefill (pp 64) at each k and
   thread count; k is set in the GGUF's `olmoe.expert_used_count` with gguf-py's `gguf_set_metadata.py` (in place,
   restored to 8 at the end; llama-bench has no --override-kv).
4. `phds.bench` times the engine, stock transformers (grouped_mm, eager) and the bandwidth floor on the same
   weights (the preset is rebuilt from its seed; its embeddings and experts are checked against the GGUF's).

Prints one table of ratios and writes `benchmarks/results/real_scale_<threads>threads.json` with the package
versions, the machine and its load. `--render docs/performance.md` rewrites the section between
`<!-- results:real-scale -->` and `<!-- /results:real-scale -->` from that JSON.

Run: `python benchmarks/bench_llamacpp.py [--k 1,2,4,8] [--threads 1,2] [--batch 1,8] [--compile]`
     `python benchmarks/bench_llamacpp.py --render docs/performance.md`
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.metadata
import json
import multiprocessing
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench-cache"
PRESET = "olmoe-1b-7b-shape"
RESULTS = ROOT / "benchmarks" / "results"
MARKERS = ("<!-- results:real-scale -->", "<!-- /results:real-scale -->")
PACKAGES = ("moe-phds", "torch", "transformers", "tokenizers", "safetensors", "numpy")


# ----------------------------------------------------------------------------- llama.cpp from the sdist


def build_llama_cpp() -> tuple[Path, Path, str]:
    """(llama.cpp source directory, llama-bench binary, llama-cpp-python version), downloading and building what
    `.bench-cache/` lacks."""
    sdists = sorted((CACHE / "sdist").glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        run(["pip", "download", "--no-binary", ":all:", "--no-deps", "llama-cpp-python", "-d", str(CACHE / "sdist")])
        sdists = sorted((CACHE / "sdist").glob("llama_cpp_python-*.tar.gz"))
    sdist = sdists[-1]
    name = sdist.name.removesuffix(".tar.gz")
    source = CACHE / name / "vendor" / "llama.cpp"
    if not source.is_dir():
        shutil.unpack_archive(sdist, CACHE)
    build = CACHE / "llama.cpp-build"
    binary = build / "bin" / "llama-bench"
    if not binary.exists():
        flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF"]
        flags += ["-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
        run(["nice", "-n", "19", "cmake", "-S", str(source), "-B", str(build), *flags, "-DLLAMA_BUILD_SERVER=OFF"])
        run(["nice", "-n", "19", "cmake", "--build", str(build), "--target", "llama-bench", "-j", "2"])
    return source, binary, name.partition("-")[2]


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, check=True, **kwargs)


# ----------------------------------------------------------------------------- the preset's weights as GGUF


def bench_config(tiny_config: str, **fields):
    """The `phds.bench` config of the benchmarked model: always bf16, the dtype llama.cpp runs too."""
    from phds.bench import BenchConfig

    return BenchConfig(tiny_config=tiny_config, dtype="bfloat16", **fields)


def save_checkpoint(tiny_config: str, directory: str) -> dict:
    """Build the model, save it as a Hugging Face checkpoint with a synthetic tokenizer; runs in a child process.
    Returns the build's time and peak resident memory."""
    from phds.bench import build_model

    start = time.perf_counter()
    model = build_model(bench_config(tiny_config))
    build_s = time.perf_counter() - start
    build_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    weights_GB = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    model.save_pretrained(directory)
    synthetic_tokenizer(model.config.vocab_size).save_pretrained(directory)
    return {
        "build_s": build_s,
        "weights_GB": weights_GB,
        "peak_rss_after_build_GB": build_rss,
        "peak_rss_after_save_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }


def synthetic_tokenizer(vocab_size: int):
    """A byte-level BPE of exactly `vocab_size` tokens (the 256 bytes, then merges of byte pairs, the last id
    "<|endoftext|>"): what `convert_hf_to_gguf.py` needs to write a GPT-2-style vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    merges = []
    for first in alphabet:
        for second in alphabet:
            if len(vocab) == vocab_size - 1:
                break
            vocab[first + second] = len(vocab)
            merges.append((first, second))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    tokenizer.add_special_tokens([eos])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=eos, eos_token=eos, pad_token=eos)


# The converter recognises a tokenizer by hashing its output on a test text; the synthetic one is declared OLMoE's.
CONVERT = """
import runpy, sys
source = sys.argv[1]
sys.path[:0] = [source, source + "/gguf-py"]
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "olmo"
sys.argv = [source + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def ensure_gguf(source: Path, tiny_config: str) -> tuple[Path, dict]:
    """The model's GGUF (bf16) in `.bench-cache/`, and how it was made; saved and converted when missing."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", tiny_config)
    gguf = CACHE / f"{slug}-bf16.gguf"
    stamp = gguf.with_suffix(".json")
    if gguf.exists() and stamp.exists():
        return gguf, json.loads(stamp.read_text())
    free_GB = shutil.disk_usage(CACHE).free / 1e9
    if free_GB < 20:
        raise SystemExit(f"{free_GB:.0f} GB free under {CACHE}: the checkpoint and the GGUF need about 15 GB")
    checkpoint = CACHE / f"{slug}-hf"
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        made = pool.submit(save_checkpoint, tiny_config, str(checkpoint)).result()
    start = time.perf_counter()
    run([sys.executable, "-c", CONVERT, str(source), str(checkpoint), "--outtype", "bf16", "--outfile", str(gguf)])
    made["convert_s"] = time.perf_counter() - start
    made["converter"] = "convert_hf_to_gguf.py --outtype bf16 (pre-tokenizer declared 'olmo')"
    shutil.rmtree(checkpoint)
    stamp.write_text(json.dumps(made, indent=2))
    return gguf, made


def check_same_weights(model, gguf: Path, source: Path) -> None:
    """The rebuilt preset has the GGUF's weights: its embeddings and layer 0's experts, bit for bit."""
    import numpy as np
    import torch

    sys.path.insert(0, str(source / "gguf-py"))
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(gguf).tensors}

    def read(name: str) -> torch.Tensor:
        data = np.asarray(tensors[name].data)
        return torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16)

    experts = model.model.layers[0].mlp.experts
    gate, up = experts.gate_up_proj.detach().chunk(2, dim=1)
    pairs = {
        "token_embd.weight": model.model.embed_tokens.weight.detach(),
        "blk.0.ffn_gate_exps.weight": gate,
        "blk.0.ffn_up_exps.weight": up,
        "blk.0.ffn_down_exps.weight": experts.down_proj.detach(),
    }
    for name, ours in pairs.items():
        theirs = read(name).reshape(ours.shape)
        if not torch.equal(theirs, ours):
            raise SystemExit(f"{gguf} holds other weights than the benchmarked model ({name} differs): delete it")


# ----------------------------------------------------------------------------- measurements


def llama_bench(binary: Path, source: Path, gguf: Path, ks, threads, repeats: int) -> list[dict]:
    """One row per (k, threads): llama-bench's batch-1 decode ms/token after a 64-token context and pp64 tok/s."""
    set_metadata = [sys.executable, str(source / "gguf-py" / "gguf" / "scripts" / "gguf_set_metadata.py"), str(gguf)]
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    common = [str(binary), "-m", str(gguf), "-t", ",".join(map(str, threads)), "-r", str(repeats), "-o", "json"]
    rows = []
    try:
        for k in ks:
            run([*set_metadata, "olmoe.expert_used_count", str(k), "--force"], env=env, capture_output=True)
            if expert_used_count(gguf, source) != k:
                raise SystemExit(f"gguf_set_metadata.py did not set olmoe.expert_used_count to {k} in {gguf}")
            tg = json.loads(run([*common, "-p", "0", "-n", "32", "-d", "64"], capture_output=True).stdout)
            pp = json.loads(run([*common, "-p", "64", "-n", "0"], capture_output=True).stdout)
            for t in threads:
                gen = next(r for r in tg if r["n_threads"] == t)
                prompt = next(r for r in pp if r["n_threads"] == t)
                rows.append(
                    {
                        "k": k,
                        "threads": t,
                        "decode_ms": statistics.median(gen["samples_ns"]) / 1e6 / gen["n_gen"],
                        "prefill_tok_s": prompt["n_prompt"] / (statistics.median(prompt["samples_ns"]) / 1e9),
                        "build": f"{gen['build_commit']} ({gen['build_number']})",
                        "cpu": gen.get("cpu_info"),
                        "flash_attn": gen.get("flash_attn"),
                    }
                )
    finally:
        run([*set_metadata, "olmoe.expert_used_count", "8", "--force"], env=env, capture_output=True)
    return rows


def expert_used_count(gguf: Path, source: Path) -> int:
    sys.path.insert(0, str(source / "gguf-py"))
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields["olmoe.expert_used_count"]
    return int(field.parts[field.data[0]][0])


class LoadMonitor(threading.Thread):
    """Samples, every `interval` seconds, the load average and the other processes (not this one or its children)
    using 10% of a core or more, per phase of the run: the machine is shared, and this says when it was not idle."""

    def __init__(self, interval: float = 5.0):
        super().__init__(daemon=True)
        self.interval, self.phase, self.phases = interval, "setup", {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            me = psutil.Process()
            mine = {me.pid, *(child.pid for child in me.children(recursive=True))}
            record = self.phases.setdefault(self.phase, {"samples": 0, "max_loadavg_1min": 0.0, "busy": {}})
            record["samples"] += 1
            record["max_loadavg_1min"] = max(record["max_loadavg_1min"], os.getloadavg()[0])
            for proc in psutil.process_iter(["name"]):
                if proc.pid in mine:
                    continue
                try:
                    percent = proc.cpu_percent(None)  # since this process's previous sample (psutil caches it)
                except psutil.Error:
                    continue
                if percent >= 10:
                    name = proc.info["name"]
                    record["busy"][name] = max(record["busy"].get(name, 0.0), percent)


def git_state() -> dict:
    """The commit measured and the files that differed from it (the working tree is what runs)."""

    def git(*command: str) -> str:
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True).stdout

    modified = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(), "modified": modified}


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    return {
        "cpu": model.group(1) if model else platform.processor(),
        "cores": os.cpu_count(),
        "memory_GB": psutil.virtual_memory().total / 1e9,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def measure(args, out: Path) -> dict:
    """Every measurement, in the order llama.cpp, the eager engine and stock at each thread count, then the compiled
    engine; `out` is rewritten after each phase ("complete": false until the last)."""
    from phds.bench import bench, build_model

    results = {
        "preset": args.tiny_config,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "complete": False,
        "options": {
            key: value
            for key, value in vars(args).items()
            if key in ("k", "threads", "batch", "repeats", "compile", "mixed")
        },
        "machine": machine(),
        "versions": {name: importlib.metadata.version(name) for name in PACKAGES},
        "git": git_state(),
        "phds": {},
    }

    monitor = LoadMonitor()
    monitor.start()
    results["load"] = monitor.phases

    def save():
        results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        out.write_text(json.dumps(results, indent=2))

    source, binary, results["versions"]["llama-cpp-python (sdist)"] = build_llama_cpp()
    gguf, results["gguf"] = ensure_gguf(source, args.tiny_config)
    monitor.phase = "llama.cpp"
    results["llama_cpp"] = llama_bench(binary, source, gguf, args.k, args.threads, args.repeats)
    results["versions"]["llama.cpp"] = results["llama_cpp"][0]["build"]
    save()
    model = build_model(bench_config(args.tiny_config))
    check_same_weights(model, gguf, source)
    for compiled in (False, True) if args.compile else (False,):
        for threads in args.threads:
            name = f"{threads}{'_compiled' if compiled else ''}"
            monitor.phase = f"phds {threads} thread{'s' if threads > 1 else ''}{' compiled' if compiled else ''}"
            config = bench_config(
                args.tiny_config,
                ks=args.k,
                batches=args.batch,
                repeats=args.repeats,
                threads=threads,
                compile=compiled,
                stock=[] if compiled else ["grouped_mm", "eager"],
                mixed=args.mixed and not compiled,
            )
            results["phds"][name] = bench(config, progress=lambda text: print(f"  {text}", flush=True), model=model)
            save()
    monitor.stopped.set()
    results["complete"] = True
    save()
    return results


# ----------------------------------------------------------------------------- one table of ratios


def rows(results: dict) -> list[dict]:
    """One row per (threads, batch, k): each contender's ms/token and the ratios (a ratio > 1: the engine is faster;
    "/ floor": times the bandwidth floor)."""
    out = []
    llama = {(r["threads"], r["k"]): r for r in results["llama_cpp"]}
    for name, run_ in results["phds"].items():
        if name.endswith("_compiled"):
            continue
        threads = int(name)
        compiled = {(d["batch"], d["k"]): d for d in results["phds"].get(f"{name}_compiled", {}).get("decode", [])}
        prefill = {(p["batch"], p["k"]): p for p in run_["prefill"]}
        for d in run_["decode"]:
            stock = min(d["stock_ms"].values())
            row = {"threads": threads, "batch": d["batch"], "k": d["k"], "engine_ms": d["engine_ms"]}
            row["stock_ms"] = stock
            row["engine_vs_stock"] = stock / d["engine_ms"]
            if (d["batch"], d["k"]) in compiled:
                row["compiled_ms"] = compiled[d["batch"], d["k"]]["engine_ms"]
            p = prefill[d["batch"], d["k"]]
            row["prefill_vs_stock"] = p["vs_best_stock"]
            if d["batch"] == 1:
                row["floor_ms"] = d["floor_ms"]
                row["llama_ms"] = llama[threads, d["k"]]["decode_ms"]
                row["engine_vs_llama"] = row["llama_ms"] / d["engine_ms"]
                row["prefill_vs_llama"] = p["engine_tok_s"] / llama[threads, d["k"]]["prefill_tok_s"]
                for key in ("engine", "stock", "llama", "compiled"):
                    if f"{key}_ms" in row:
                        row[f"{key}_x_floor"] = row[f"{key}_ms"] / d["floor_ms"]
            out.append(row)
    return out


COLUMNS = [
    ("threads", "threads", "{}"),
    ("batch", "batch", "{}"),
    ("k", "k", "{}"),
    ("floor_ms", "floor ms", "{:.1f}"),
    ("engine_ms", "engine ms", "{:.1f}"),
    ("compiled_ms", "compiled ms", "{:.1f}"),
    ("stock_ms", "best stock ms", "{:.1f}"),
    ("llama_ms", "llama.cpp ms", "{:.1f}"),
    ("engine_vs_stock", "engine vs stock", "{:.2f}x"),
    ("engine_vs_llama", "engine vs llama.cpp", "{:.2f}x"),
    ("engine_x_floor", "engine / floor", "{:.2f}"),
    ("stock_x_floor", "stock / floor", "{:.2f}"),
    ("llama_x_floor", "llama.cpp / floor", "{:.2f}"),
    ("compiled_x_floor", "compiled / floor", "{:.2f}"),
    ("prefill_vs_stock", "prefill vs stock", "{:.2f}x"),
    ("prefill_vs_llama", "prefill vs llama.cpp", "{:.2f}x"),
]


def table(results: dict) -> str:
    """The ratios as a Markdown table (columns nothing in this run measured are left out)."""
    data = rows(results)
    columns = [c for c in COLUMNS if any(c[0] in row for row in data)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in data:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(results: dict) -> list[str]:
    """Issue 16's goals for batch-1 decode and prefill, for the engine and (when measured) the compiled engine, each
    met or not with the figure that decides it; then the mixed-k batch."""
    lines = []
    for threads in sorted({row["threads"] for row in rows(results)}):
        batch1 = {r["k"]: r for r in rows(results) if r["threads"] == threads and r["batch"] == 1}
        low, high = min(batch1), max(batch1)
        floor_ratio = batch1[high]["floor_ms"] / batch1[low]["floor_ms"]
        prefill = min(r["prefill_vs_stock"] for r in batch1.values())
        label = f"{threads} thread{'s' if threads > 1 else ''}"
        for name, key in (("engine", "engine_ms"), ("compiled engine", "compiled_ms")):
            if not all(key in r for r in batch1.values()):
                continue
            vs_llama = min(r["llama_ms"] / r[key] for r in batch1.values())
            vs_stock = min(r["stock_ms"] / r[key] for r in batch1.values())
            time_ratio = batch1[high][key] / batch1[low][key]
            checks = [
                (f"decode within 1.25x llama.cpp's time at every k (worst: {1 / vs_llama:.2f}x)", vs_llama >= 0.8),
                (f"decode >= 1.5x stock transformers at every k (worst: {vs_stock:.2f}x)", vs_stock >= 1.5),
                (
                    f"dial payoff t({high})/t({low}) >= 0.9x the floors' ratio ({time_ratio:.2f} against "
                    f"{floor_ratio:.2f}: {time_ratio / floor_ratio:.2f}x)",
                    time_ratio >= 0.9 * floor_ratio,
                ),
            ]
            if name == "engine":  # the compiled engine prefills eagerly: the same figure
                checks.append((f"prefill not slower than stock at every k (worst: {prefill:.2f}x)", prefill >= 1.0))
            for text, met in checks:
                lines.append(f"- {label}, {name}: {'met' if met else '**not met**'}: {text}")
        mixed = results["phds"][str(threads)].get("mixed")
        if mixed:
            lines.append(
                f"- {label}, mixed-k batch (k = {', '.join(map(str, mixed['ks']))}): decode "
                f"{mixed['decode_speedup']:.2f}x faster as one batch than one after another (bandwidth bound "
                f"{mixed['floor_bound']:.2f}x), outputs identical: {'yes' if mixed['outputs_identical'] else 'no'}"
            )
    return lines


def disturbed(results: dict) -> list[str]:
    """A warning per phase during which another process kept a core busy: with 2 threads on 2 cores, a step then
    waits for a core (stalls of a second or more), so that phase's figures measure the machine, not the code."""
    lines = [
        f"- **Disturbed: {phase}**: other processes were busy during it "
        f"({', '.join(f'{name} up to {percent:.0f}% of a core' for name, percent in record['busy'].items())}); "
        "its figures are bounded by the shared machine, not by the code."
        for phase, record in results["load"].items()
        if record["busy"]
    ]
    return [*lines, ""] if lines else []


def render(results: dict, source: str) -> str:
    model = next(iter(results["phds"].values()))["model"]
    bandwidths = ", ".join(
        f"{run_['machine']['bandwidth_GBps']:.1f} GB/s with {run_['machine']['threads']} thread"
        f"{'s' if run_['machine']['threads'] > 1 else ''}"
        for name, run_ in results["phds"].items()
        if not name.endswith("_compiled")
    )
    busy = [
        f"{phase}: "
        + (", ".join(f"{name} up to {percent:.0f}%" for name, percent in record["busy"].items()) or "none")
        + f" (1-minute load average up to {record['max_loadavg_1min']:.2f})"
        for phase, record in results["load"].items()
    ]
    versions = ", ".join(f"{name} {version}" for name, version in results["versions"].items())
    return "\n".join(
        [
            f"Rendered from `{source}` by `benchmarks/bench_llamacpp.py --render` (run {results['started']} to "
            f"{results['finished']}; {results['machine']['cpu']}, {results['machine']['cores']} cores).",
            "",
            f"`{results['preset']}`: {model['parameters'] / 1e9:.2f}B parameters, {model['dtype']}, "
            f"{results['gguf']['weights_GB']:.2f} GB of weights; building it peaked at "
            f"{results['gguf']['peak_rss_after_build_GB']:.2f} GB resident ({results['gguf']['build_s']:.0f} s). "
            f"Measured bandwidth: {bandwidths}. Times are ms per token per sequence (medians); a ratio "
            "`engine vs X` above 1 means the engine is faster; `/ floor` is the time over the bandwidth floor "
            "(the bytes one token's weights take at that k, read once). llama.cpp: `llama-bench`, decode after a "
            "64-token context, prefill of 64 tokens (batch 1 only). Stock: the faster of transformers' grouped_mm "
            "and eager experts.",
            "",
            table(results),
            "",
            f"Run options: {', '.join(f'{key} {value}' for key, value in results['options'].items())}"
            f"{'' if results['complete'] else ' (the run did not complete: the rows shown are those it measured)'}.",
            "",
            *disturbed(results),
            "Issue 16's goals, in this run:",
            "",
            *goals(results),
            "",
            "Other processes using 10% of a core or more during each phase (sampled every 5 s): "
            + "; ".join(busy)
            + ". "
            f"Versions: {versions}. Commit {results['git']['commit'][:7]}"
            f"{', with uncommitted changes to ' + ', '.join(results['git']['modified']) if results['git']['modified'] else ''}.",
        ]
    )


def write_section(path: Path, text: str, markers: tuple[str, str] = MARKERS) -> None:
    """Replace the text between `markers` in the Markdown file `path` (also used by bench_busy_neighbour.py)."""
    document = path.read_text()
    start, end = markers
    if start not in document or end not in document:
        raise SystemExit(f"{path} has no {start} ... {end} section to rewrite")
    head, _, rest = document.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-config", default=PRESET, help="phds bench preset or family spec (built in bf16)")
    parser.add_argument("--k", type=_ints, default=[1, 2, 4, 8], help="experts per token, e.g. 1,2,4,8")
    parser.add_argument("--threads", type=_ints, default=[1, 2], help="thread counts, e.g. 1,2")
    parser.add_argument("--batch", type=_ints, default=[1], help="phds decode batch sizes (llama.cpp: 1), e.g. 1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time the compiled engine")
    parser.add_argument("--no-mixed", dest="mixed", action="store_false", help="skip the mixed-k batch row")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: real_scale_<threads>.json)")
    parser.add_argument("--render", type=Path, default=None, help="rewrite this Markdown file's section and stop")
    parser.add_argument("--results", type=Path, default=RESULTS / "real_scale_1-2threads.json")
    args = parser.parse_args()
    if args.render is not None:
        results = json.loads(args.results.read_text())
        write_section(args.render, render(results, str(args.results.relative_to(ROOT))))
        print(f"rewrote the real-scale section of {args.render}")
        raise SystemExit(0)
    CACHE.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"real_scale_{'-'.join(map(str, args.threads))}threads.json"
    results = measure(args, out)
    print(table(results))
    print("\n".join(goals(results)))
    print(f"wrote {out}")
