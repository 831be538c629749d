"""What `phds bench` measures (`BenchConfig`) and the model it measures (`build_model`, `PRESETS`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from phds.sidecar import check_ks

# Random models named after their shape. "olmoe-shape-small": OLMoE's routing (64 experts, k_pre 8, no top-k
# renormalisation) at a size a CPU decodes in milliseconds: 8 layers, hidden 512, fp32, 420M parameters (1.7 GB).
# Its "overhead-only" twin has the same layers, experts, heads, vocabulary and k with hidden and expert sizes cut
# to 64, so its weights are negligible and its step time is what the modelling code's tensor ops cost.
DEFAULT_PRESET = "olmoe-shape-small"
_OLMOE_SHAPE_SMALL = dict(
    num_experts=64,
    num_experts_per_tok=8,
    num_hidden_layers=8,
    hidden_size=512,
    intermediate_size=512,
    vocab_size=8192,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=4096,
)
# "olmoe-1b-7b-shape": OLMoE-1B-7B's per-layer shapes (hidden 2048, 16 heads, 64 experts of intermediate 1024,
# k_pre 8, vocabulary 50304, no top-k renormalisation) with 8 of its 16 layers: 3.56B parameters, built directly in
# bf16 (7.1 GB; an fp32 copy would need twice that). The real-scale benchmark, benchmarks/bench_llamacpp.py, uses it.
_OLMOE_1B_7B_SHAPE = dict(
    num_experts=64,
    num_experts_per_tok=8,
    num_hidden_layers=8,
    hidden_size=2048,
    intermediate_size=1024,
    vocab_size=50304,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=4096,
    norm_topk_prob=False,
)
PRESETS: dict[str, tuple[str, dict]] = {
    DEFAULT_PRESET: ("olmoe", _OLMOE_SHAPE_SMALL),
    "olmoe-shape-small-overhead-only": ("olmoe", {**_OLMOE_SHAPE_SMALL, "hidden_size": 64, "intermediate_size": 64}),
    "olmoe-1b-7b-shape": ("olmoe", _OLMOE_1B_7B_SHAPE),
}
# The parameter dtype of a preset when `BenchConfig.dtype` is None (float32 for presets not named here).
PRESET_DTYPES = {"olmoe-1b-7b-shape": "bfloat16"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(kw_only=True)
class BenchConfig:
    """What `bench` measures.

    Attributes:
        model: checkpoint directory, hub name or `tiny:<family>`; or None with `tiny_config`.
        tiny_config: a preset (`PRESETS`, default "olmoe-shape-small") or `family:field=value,...` for a random
            tiny model.
        dtype: parameter dtype, "float32", "bfloat16" or "float16". None: the preset's (`PRESET_DTYPES`, else
            float32) for a random model, the checkpoint's for `model`. A random model is built in this dtype
            directly; no float32 copy of its weights ever exists.
        ks: experts per token to measure.
        batches: decode batch sizes.
        prompt_len: prompt tokens per request.
        new_tokens: decode steps timed per measurement.
        repeats: measurements per figure (the median is reported).
        stock: stock transformers experts implementations to compare against.
        decode: run the decode and prefill rows (off for a training-only run).
        mixed: also run the mixed-k batch row.
        train: also time a training step (`train_batch` x `train_seq`) per k.
        threads: torch threads (None keeps torch's default).
        compile: `torch.compile` the engine's decode step (`Engine(compile=True)`); each k and batch shape compiles
            in an untimed warm-up run before it is timed (`compile_s` in the results).
        seed: prompts and the random model.

    Example: `BenchConfig(tiny_config="olmoe:num_experts=16", ks=[1, 4], repeats=1)`.
    """

    model: str | None = None
    tiny_config: str | None = DEFAULT_PRESET
    dtype: str | None = None
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    batches: list[int] = field(default_factory=lambda: [1])
    prompt_len: int = 64
    new_tokens: int = 32
    repeats: int = 3
    stock: list[str] = field(default_factory=lambda: ["grouped_mm", "eager"])
    decode: bool = True
    mixed: bool = True
    train: bool = False
    train_batch: int = 4
    train_seq: int = 128
    threads: int | None = None
    compile: bool = False
    seed: int = 0

    def __post_init__(self):
        for name in ("prompt_len", "new_tokens", "repeats", "train_batch", "train_seq"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
        if self.new_tokens < 2:
            raise ValueError(f"`new_tokens` must be >= 2 to time a decode step, got {self.new_tokens}")
        self.ks = check_ks(self.ks)
        batches = self.batches
        if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
            raise ValueError(f"`batches` must be a non-empty list of integers >= 1, got {batches!r}")
        unknown = [s for s in self.stock if s not in ("eager", "grouped_mm", "batched_mm")]
        if unknown:
            raise ValueError(f"`stock` must name eager, grouped_mm or batched_mm, got {unknown}")
        if (self.model is None) == (self.tiny_config is None):
            raise ValueError(
                f"give exactly one of `model` and `tiny_config`, got model={self.model!r} and "
                f"tiny_config={self.tiny_config!r}; pass tiny_config=None with a model"
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {list(DTYPES)} or None, got {self.dtype!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"`threads` must be an integer >= 1, got {self.threads!r}")


def build_model(config: BenchConfig):
    """The model to benchmark, in eval mode, in `config.dtype` (see `BenchConfig`).

    A random model is created in its dtype by `phds.tiny_model` (transformers' `from_config` with that dtype as
    torch's default while the modules are built) and initialised in place from `config.seed`.

    Example: `build_model(BenchConfig(tiny_config="olmoe:num_experts=16", dtype="bfloat16"))`.
    """
    if config.model is not None:
        from phds.loading import load

        model, _ = load(config.model, tokenizer=False, device="cpu", dtype=config.dtype or "auto")
        return model
    from phds.tiny import FAMILIES, tiny_model

    name = config.tiny_config
    dtype = DTYPES[config.dtype or PRESET_DTYPES.get(name, "float32")]
    if name in PRESETS:
        arch, overrides = PRESETS[name]
    elif name.partition(":")[0] not in FAMILIES:
        raise ValueError(
            f"`tiny_config` must be a preset {sorted(PRESETS)} or 'family:field=value,...' with a family of "
            f"{list(FAMILIES)}, got {name!r}"
        )
    else:
        arch, _, fields = name.partition(":")
        overrides = {}
        for item in filter(None, (f.strip() for f in fields.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"`tiny_config` fields must be key=value, got {item!r} in {name!r}")
            overrides[key] = _literal(value)
    return tiny_model(arch, seed=config.seed, dtype=dtype, **overrides)


def _literal(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)
