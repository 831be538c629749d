"""An experiment spec: what is trained, how often, how it is judged — all declared before anything runs.

A spec (TOML or YAML, or built in Python) names the base model (or a pretraining stage), the SFT data, the
evaluation tasks, the declared ks K, the **arms**, the **seeds**, the **checkpoint rule** and the
**non-inferiority margins**. Example (the demo's spec is `phds/experiment/specs/demo.toml`):

    name = "my-olmoe"
    ks = [4, 6, 8]
    seeds = [0, 1, 2]
    checkpoint = "final"                 # or "validation"
    margin = { acc_norm = 0.02 }         # PHDS may be at most this much worse and still count as non-inferior
    base = { model = "allenai/OLMoE-1B-7B-0125" }
    data = { train = "{spec}/sft.jsonl", valid = "{spec}/valid.jsonl", tasks = ["arc_easy"] }
    training = { max_steps = 2000, learning_rate = 2e-5 }
    arms = [{ kind = "phds", anchor_k = 4 }, { kind = "oracle" }, { kind = "sft-dialled" }, { kind = "base-dialled" }]

Strings may use `{out}` (the experiment's output folder), `{spec}` (the spec file's folder) and `{data}`
(`$PHDS_DATA`, default `../shared/data`). An SFT seed sets the data order, the k schedule and the initialisation of
anything new; the base model is the same for every seed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from phds.policies import POLICIES
from phds.sidecar import check_ks

ARM_KINDS = ("phds", "phds-layer", "oracle", "sft-dialled", "base-dialled", "policy")
TRAINED_OVER_K = ("phds", "phds-layer")
CHECKPOINT_RULES = ("final", "validation")
STATISTICS = ("t", "bootstrap")
GENERATORS = ("demo", "holdout")


@dataclass(kw_only=True)
class Arm:
    """One way of getting a model at each k, trained and evaluated like every other arm except for what defines it.

    Attributes:
        kind: "phds" (one SFT over K with the anchor curriculum), "phds-layer" (the same with a k drawn per MoE layer
            per step, Matryoshka-MoE style), "oracle" (one SFT at a fixed k; a spec's `{kind = "oracle"}` without
            `k` expands to one arm per k in K), "sft-dialled" (one ordinary SFT at k_pre, dialled to every k),
            "base-dialled" (the base model, dialled to every k; not trained) or "policy" (another arm's checkpoints
            run with a training-free routing policy, calibrated per run to each budget).
        name: unique label (default "phds", "oracle-k{k}", "sft-dialled", "base-dialled", "{of}+{policy}").
        k: the oracle's k.
        ks: PHDS's declared ks (default the experiment's K).
        anchor_k: PHDS's anchor (default min K); anchor_fraction: share of steps of the anchor curriculum.
        tasks: evaluation tasks for this arm instead of the experiment's, item for item the same (e.g. the base
            model's own prompt format); they must hold as many items as the tasks they replace.
        of, policy, budgets: a policy arm's checkpoints (the arm whose runs it reuses), its routing policy ("top_p"
            or "skip") and the mean routed experts per token it is calibrated to (ks of K below k_pre by default),
            on the validation split; it is compared with the other arms at k = budget, beside the experts it
            measured on each task.
    """

    kind: str
    name: str | None = None
    k: int | None = None
    ks: list[int] | None = None
    anchor_k: int | None = None
    anchor_fraction: float = 0.1
    tasks: list[str] | None = None
    of: str | None = None
    policy: str | None = None
    budgets: list[int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ARM_KINDS:
            raise ValueError(f"arm `kind` must be one of {list(ARM_KINDS)}, got {self.kind!r}")
        if self.k is not None and self.kind != "oracle":
            raise ValueError(f"only an oracle arm takes `k`, got k={self.k} on a {self.kind!r} arm")
        if (self.ks is not None or self.anchor_k is not None) and self.kind not in TRAINED_OVER_K:
            raise ValueError(f"only a phds arm takes `ks` / `anchor_k`, got them on a {self.kind!r} arm")
        if self.kind == "policy":
            if self.of is None or self.policy not in POLICIES:
                raise ValueError(
                    f"a policy arm needs `of` (the arm whose checkpoints it runs) and `policy` (one of "
                    f"{sorted(POLICIES)}), got of={self.of!r}, policy={self.policy!r}"
                )
            if self.tasks is not None:
                raise ValueError("a policy arm is evaluated on its `of` arm's tasks; drop `tasks`")
            if self.name is None:
                self.name = f"{self.of}+{self.policy}"
        elif self.of is not None or self.policy is not None or self.budgets is not None:
            raise ValueError(f"only a policy arm takes `of` / `policy` / `budgets`, got them on a {self.kind!r} arm")
        if not 0 <= self.anchor_fraction <= 1:
            raise ValueError(f"arm `anchor_fraction` must be in [0, 1], got {self.anchor_fraction}")
        if self.name is None:
            self.name = f"oracle-k{self.k}" if self.kind == "oracle" and self.k is not None else self.kind


@dataclass(kw_only=True)
class Pretrain:
    """A pretraining stage that builds the base model from scratch (the demo's; any tiny-model family).

    Attributes:
        data: the pretraining text (a .txt file: one document per line).
        architecture: a `phds.tiny_model` family; `model` holds its config overrides (num_experts, ...).
        tokenizer: "tiny" (the built-in character-level tokenizer) or a `tokenizers` JSON file, with
            `tokenizer_tokens` naming its eos / pad tokens.
        steps, learning_rate, batch_size, max_length, packing, seed: the pretraining run.
    """

    data: str
    architecture: str = "olmoe"
    model: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = "tiny"
    tokenizer_tokens: dict[str, str] = field(default_factory=dict)
    steps: int = 1000
    learning_rate: float = 3e-3
    batch_size: int = 64
    max_length: int = 64
    packing: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"pretrain `{name}` must be a positive integer, got {getattr(self, name)!r}")


@dataclass(kw_only=True)
class Data:
    """SFT data and evaluation tasks, optionally made by a generator into `{out}/data` first.

    Attributes:
        train, valid: SFT rows (files or `datasets` names); `valid` is the validation split (checkpoint selection
            and tuning); evaluation items are never used for either.
        tasks: evaluation tasks (paths or names in `$PHDS_DATA/eval`).
        generator: "demo" (`phds.demo_data.make_demo_data(**options)`, plus the evaluation items in the base
            model's raw format as `base_mc.jsonl` / `base_em.jsonl`) or "holdout" (options `source`, `held_out`,
            `name`: the last `held_out` share of a text file's lines becomes `{name}.txt`, the rest
            `{name}_train.txt`).
    """

    train: str
    valid: str | None = None
    tasks: list[str] = field(default_factory=list)
    generator: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("`data.tasks` must name at least one evaluation task")
        if self.generator is not None and self.generator not in GENERATORS:
            raise ValueError(f"`data.generator` must be one of {list(GENERATORS)}, got {self.generator!r}")
        if self.generator == "holdout" and not {"source", "name"} <= set(self.options):
            raise ValueError(f"the holdout generator needs `data.options.source` and `.name`, got {self.options}")


@dataclass(kw_only=True)
class ExperimentSpec:
    """Everything an experiment's result depends on. See the module docstring for the file format.

    Attributes:
        name: the experiment's name (reports).
        ks: the declared ks K: PHDS trains over them, each gets an oracle, every dialled arm is evaluated at each.
        seeds: SFT seeds; every trained arm runs once per seed. Runs are the unit of analysis.
        arms: the arms; `reference` names the one compared against every other (default "phds").
        checkpoint: "final" (every run keeps its last step) or "validation" (every run keeps its step with the
            best validation loss, scored the same way: PHDS and sft-dialled by the mean over K, an oracle at its k).
        margin: non-inferiority margin per metric, in the metric's units (perplexity: mean NLL per token, i.e. log
            perplexity); a bare number applies to every metric. Declared before anything runs, written into results.
        statistics: "t" (t interval over seeds of the per-seed paired difference) or "bootstrap" (hierarchical:
            resample seeds, then items within each seed).
        base: `{"model": name}` for an existing base model, or `{"pretrain": {...}}` (a `Pretrain`).
        data: a `Data`. training: `PHDSConfig` fields shared by every run. evaluation: `phds.evaluate` keywords.
    """

    name: str
    ks: list[int]
    seeds: list[int]
    arms: list[Arm]
    data: Data
    base_model: str | None = None
    pretrain: Pretrain | None = None
    checkpoint: str = "final"
    margin: dict[str, float] = field(default_factory=dict)
    reference: str = "phds"
    statistics: str = "t"
    confidence: float = 0.95
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        self.ks = check_ks(self.ks)
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"`seeds` must be a non-empty list of non-negative integers, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"`seeds` must be distinct, got {self.seeds}")
        if (self.base_model is None) == (self.pretrain is None):
            raise ValueError("`base` must give exactly one of `model` (an existing base model) and `pretrain`")
        if self.checkpoint not in CHECKPOINT_RULES:
            raise ValueError(f"`checkpoint` must be one of {list(CHECKPOINT_RULES)}, got {self.checkpoint!r}")
        if self.statistics not in STATISTICS:
            raise ValueError(f"`statistics` must be one of {list(STATISTICS)}, got {self.statistics!r}")
        if not 0.5 < self.confidence < 1:
            raise ValueError(f"`confidence` must be in (0.5, 1), got {self.confidence}")
        bad = {m: v for m, v in self.margin.items() if not isinstance(v, (int, float)) or v < 0}
        if bad:
            raise ValueError(f"`margin` values must be non-negative numbers, got {bad}")
        per_run = ("output_dir", "seed", "fixed_k", "ks", "anchor_k", "anchor_fraction", "select_by", "eval_ks")
        for key in (*per_run, "resume_from_checkpoint"):
            if key in self.training:
                raise ValueError(f"`training.{key}` is set by the experiment per run (arm, seed, checkpoint rule)")
        self.arms = _expand_arms(self.arms, self.ks)
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        if self.reference not in names:
            raise ValueError(f"`reference` must name an arm, got {self.reference!r}; arms are {names}")
        for arm in self.arms:
            if arm.kind == "oracle" and arm.k not in self.ks:
                raise ValueError(f"oracle arm {arm.name!r} is at k={arm.k}, which is not in `ks` {self.ks}")
            if arm.kind in TRAINED_OVER_K:
                arm.ks = check_ks(arm.ks, name=f"arms.{arm.name}.ks") if arm.ks is not None else list(self.ks)
                if not set(arm.ks) <= set(self.ks):
                    raise ValueError(f"arm {arm.name!r} declares ks {arm.ks} outside the experiment's ks {self.ks}")
                arm.anchor_k = min(arm.ks) if arm.anchor_k is None else arm.anchor_k
                if arm.anchor_k not in arm.ks:
                    raise ValueError(f"arm {arm.name!r}: `anchor_k` {arm.anchor_k} is not one of its ks {arm.ks}")
            if arm.kind == "policy":
                self._check_policy_arm(arm)
            if arm.tasks is not None and len(arm.tasks) != len(self.data.tasks):
                raise ValueError(
                    f"arm {arm.name!r} replaces the {len(self.data.tasks)} tasks with {len(arm.tasks)}; "
                    "give one replacement per task"
                )

    def _check_policy_arm(self, arm: Arm) -> None:
        of = next((other for other in self.arms if other.name == arm.of), None)
        if of is None or of.kind in ("policy", "oracle"):
            raise ValueError(
                f"policy arm {arm.name!r}: `of` must name a single-checkpoint arm (phds, sft-dialled, base-dialled), "
                f"got {arm.of!r}"
            )
        arm.tasks = of.tasks
        if arm.budgets is not None:
            arm.budgets = check_ks(arm.budgets, name=f"arms.{arm.name}.budgets")
            if not set(arm.budgets) <= set(self.ks):
                raise ValueError(
                    f"policy arm {arm.name!r}: `budgets` {arm.budgets} must be among the ks {self.ks}, "
                    "where the other arms are measured"
                )
        if self.data.valid is None:
            raise ValueError(f"policy arm {arm.name!r} is calibrated on the validation split: set `data.valid`")

    def margin_of(self, metric: str) -> float:
        """The declared margin of `metric` (0 where none was declared: then only "better" or "worse" can be told)."""
        return float(self.margin.get(metric, self.margin.get("*", 0.0)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, spec_dir: str | os.PathLike = ".", out_dir: str | os.PathLike = "."):
        """Build a spec from a parsed TOML/YAML mapping, with `{spec}`, `{out}` and `{data}` filled in."""
        data = _fill(dict(data), spec_dir=Path(spec_dir), out_dir=Path(out_dir))
        _reject_unknown("the spec", data, ({f.name for f in fields(cls)} | {"base"}) - {"base_model", "pretrain"})
        base = data.pop("base", None)
        if not isinstance(base, dict) or set(base) - {"model", "pretrain"} or len(base) != 1:
            raise ValueError("`base` must be a table with exactly one of `model` or `pretrain`")
        if "pretrain" in base:
            _reject_unknown("`base.pretrain`", base["pretrain"], {f.name for f in fields(Pretrain)})
            data["pretrain"] = Pretrain(**base["pretrain"])
        else:
            data["base_model"] = base["model"]
        if not isinstance(data.get("data"), dict):
            raise ValueError("`data` must be a table with `train`, `tasks` and optionally `valid`, `generator`")
        _reject_unknown("`data`", data["data"], {f.name for f in fields(Data)})
        data["data"] = Data(**data["data"])
        arms = data.get("arms")
        if not isinstance(arms, list) or not arms or not all(isinstance(a, dict) for a in arms):
            raise ValueError("`arms` must be a non-empty list of tables, e.g. [{kind = 'phds'}, {kind = 'oracle'}]")
        for arm in arms:
            _reject_unknown("an arm", arm, {f.name for f in fields(Arm)})
        data["arms"] = [Arm(**arm) for arm in arms]
        margin = data.get("margin", {})
        data["margin"] = {"*": margin} if isinstance(margin, (int, float)) else dict(margin)
        missing = [name for name in ("name", "ks", "seeds") if name not in data]
        if missing:
            raise ValueError(f"the spec lacks {missing}")
        return cls(**data)


def _expand_arms(arms: list[Arm], ks: list[int]) -> list[Arm]:
    expanded = []
    for arm in arms:
        if arm.kind == "oracle" and arm.k is None:
            expanded.extend(Arm(kind="oracle", k=k, tasks=arm.tasks) for k in ks)
        else:
            expanded.append(arm)
    return expanded


def _reject_unknown(where: str, table: Any, known: set[str]) -> None:
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table, got {table!r}")
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; known keys are {sorted(known)}")


def _fill(value: Any, *, spec_dir: Path, out_dir: Path) -> Any:
    if isinstance(value, str) and "{" in value:
        data_dir = os.environ.get("PHDS_DATA", "../shared/data")
        return value.replace("{spec}", str(spec_dir)).replace("{out}", str(out_dir)).replace("{data}", data_dir)
    if isinstance(value, dict):
        return {key: _fill(item, spec_dir=spec_dir, out_dir=out_dir) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, spec_dir=spec_dir, out_dir=out_dir) for item in value]
    return value


def read_spec_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a .toml, .yaml or .yml spec file into a mapping (no placeholders filled).

    Example: `read_spec_file("experiment.toml")["seeds"]`.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"spec file {str(path)!r}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                import tomli as tomllib
            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
            if not isinstance(data, dict):
                raise ValueError(f"spec file {path}: the top level must be a mapping")
            return data
    except ValueError as error:  # tomllib.TOMLDecodeError and yaml's errors are ValueErrors or YAMLError
        raise ValueError(f"spec file {path}: {error}") from error
    except Exception as error:  # yaml.YAMLError does not derive from ValueError
        raise ValueError(f"spec file {path}: {error}") from error
    raise ValueError(f"spec file {path}: use a .toml, .yaml or .yml file")


def merge(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """`data` with `overrides` applied; tables are merged key by key, anything else replaced.

    Example: `merge({"training": {"max_steps": 300, "seed": 1}}, {"training": {"max_steps": 5}})`
    -> `{"training": {"max_steps": 5, "seed": 1}}`.
    """
    merged = dict(data)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_spec(
    path: str | os.PathLike, out_dir: str | os.PathLike, overrides: dict[str, Any] | None = None
) -> ExperimentSpec:
    """Read a spec file, apply `overrides` (e.g. `{"seeds": [0, 1], "training": {"max_steps": 50}}`; tables merge
    key by key), fill placeholders, validate.

    Example: `spec = load_spec("experiment.toml", "runs/exp")`.
    """
    data = merge(read_spec_file(path), overrides)
    return ExperimentSpec.from_dict(data, spec_dir=Path(path).resolve().parent, out_dir=Path(out_dir))
