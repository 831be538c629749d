"""The built-in synthetic corpus of `phds demo`: a few distinct skills, seeded, character level, no downloads.

Every example is one *instance* of a skill: a body that starts with the skill's marker ("ADD 12+7") and an answer
("19"). The same instance is written two ways, so that SFT is a small change of domain rather than more of the same:

    pretraining line   "ADD 12+7= 19"                     (raw text, one example per line)
    SFT / evaluation   prompt "Q:ADD 12+7? A:"  completion " 19"

The space before every answer is the target delimiter of log-likelihood scoring (lm-evaluation-harness scores
" " + choice after the query), so multiple choice scores exactly the text the model was trained to produce.

Splits are disjoint by construction: a stable hash of (skill, body) puts every instance of the instance space into one
fixed bucket (evaluation 15%, SFT validation 10%, SFT training 25%, pretraining 50%), independent of the seed. So no
seed's evaluation item is ever a training item of any seed, and `make_demo_data` only has to sample inside buckets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

SKILLS: tuple[str, ...] = ("add", "reverse", "sort", "recall", "sequence", "copy")
# Which of 100 hash buckets each split owns; see the module docstring.
_SPLIT_BUCKETS = {
    "eval": range(0, 15),
    "sft_valid": range(15, 25),
    "sft_train": range(25, 50),
    "pretrain": range(50, 100),
}
SPLITS: tuple[str, ...] = tuple(_SPLIT_BUCKETS)
_FILES = {
    "pretrain": "pretrain.txt",
    "sft_train": "sft_train.jsonl",
    "sft_valid": "sft_valid.jsonl",
    "eval_mc": "eval_mc.jsonl",
    "eval_em": "eval_em.jsonl",
}
# Every split owns at least 10% of each skill's space, so while it has unseen instances left about one draw in 10 lands
# there; 5000 misses in a row means it is used up.
_MAX_MISSES = 5000
_LETTERS = string.ascii_lowercase
_ALNUM = string.ascii_lowercase + string.digits
N_CHOICES = 4


@dataclass(frozen=True)
class Instance:
    """One example of a skill: `body` starts with the skill's marker, `answer` is what the model must produce."""

    skill: str
    body: str
    answer: str
    distractors: tuple[str, ...]  # wrong answers of the same format, for multiple choice

    @property
    def raw(self) -> str:
        """The pretraining line, e.g. "ADD 12+7= 19"."""
        return f"{self.body}= {self.answer}"

    @property
    def prompt(self) -> str:
        """The SFT / evaluation prompt, e.g. "Q:ADD 12+7? A:"."""
        return f"Q:{self.body}? A:"


# ---------------------------------------------------------------------------------------------------------------------
# The skills. Each draws one instance from `rng`; the body never contains "=" or "?" so the formats stay parseable.


def _wrong_answers(rng: random.Random, gold: str, candidates: list[str], fill: Callable[[], str]) -> tuple[str, ...]:
    """Three distinct wrong answers: plausible `candidates` first (in random order), then `fill()` until enough."""
    rng.shuffle(candidates)
    wrong: list[str] = []
    for candidate in candidates:
        if candidate != gold and candidate not in wrong:
            wrong.append(candidate)
    while len(wrong) < N_CHOICES - 1:
        candidate = fill()
        if candidate != gold and candidate not in wrong:
            wrong.append(candidate)
    return tuple(wrong[: N_CHOICES - 1])


def _word(rng: random.Random, low: int, high: int, alphabet: str = _LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _mutate(rng: random.Random, text: str, alphabet: str = _LETTERS) -> str:
    """`text` with one position replaced by another character: a near miss."""
    i = rng.randrange(len(text))
    return text[:i] + rng.choice(alphabet.replace(text[i], "")) + text[i + 1 :]


def _near_misses(rng: random.Random, gold: str, alphabet: str) -> tuple[str, ...]:
    """Three wrong strings that differ from `gold` in one or two places: two adjacent characters swapped, or one
    character replaced by another character of `gold`. Obvious misses (the unchanged input, a foreign letter) would
    let multiple choice saturate long before exact match does, hiding the cost of a smaller k."""
    swaps = [gold[:i] + gold[i + 1] + gold[i] + gold[i + 2 :] for i in range(len(gold) - 1)]
    own = "".join(sorted(set(gold)))
    replaced = [_mutate(rng, gold, own) for _ in range(2)] if len(own) > 1 else []
    return _wrong_answers(rng, gold, swaps + replaced, lambda: _mutate(rng, gold, alphabet))


def _add(rng: random.Random) -> Instance:
    # A one- or two-digit number plus a digit: a table of digit sums (feed-forward memory, i.e. expert capacity) and a
    # carry. Two two-digit operands stay near zero exact match for a tiny model trained for a few minutes.
    a, b = rng.randint(0, 99), rng.randint(0, 9)
    total = a + b
    near = [total + d for d in (-11, -10, -9, -2, -1, 1, 2, 9, 10, 11)]
    wrong = _wrong_answers(rng, str(total), [str(n) for n in near if n >= 0], lambda: str(rng.randint(0, 108)))
    return Instance("add", f"ADD {a}+{b}", str(total), wrong)


def _reverse(rng: random.Random) -> Instance:
    word = _word(rng, 3, 6)
    gold = word[::-1]
    return Instance("reverse", f"REV {word}", gold, _near_misses(rng, gold, _LETTERS))


def _sort(rng: random.Random) -> Instance:
    word = _word(rng, 3, 6)
    gold = "".join(sorted(word))
    return Instance("sort", f"SRT {word}", gold, _near_misses(rng, gold, _LETTERS))


def _recall(rng: random.Random) -> Instance:
    # Key-value recall: distinct keys and distinct values, so the other values in context are the natural distractors.
    # Two or three pairs: a 2-layer model needs an induction-style lookup here, and more pairs stay at chance.
    n_pairs = rng.randint(2, 3)
    keys = rng.sample(_LETTERS, n_pairs)
    values = rng.sample(string.digits, n_pairs)
    query = rng.randrange(n_pairs)
    pairs = ",".join(f"{k}:{v}" for k, v in zip(keys, values, strict=True))
    gold = values[query]
    others = [v for v in values if v != gold]
    wrong = _wrong_answers(rng, gold, others, lambda: rng.choice(string.digits))
    return Instance("recall", f"KV {pairs};{keys[query]}", gold, wrong)


def _sequence(rng: random.Random) -> Instance:
    # Counting by a step: continue an arithmetic progression (up or down, step 1-3) that stays within 0..99.
    # Larger steps make it harder arithmetic than the `add` skill, which a tiny model barely learns.
    n_terms = rng.randint(3, 4)
    while True:
        start, step = rng.randint(0, 99), rng.choice([-3, -2, -1, 1, 2, 3])
        terms = [start + i * step for i in range(n_terms + 1)]
        if all(0 <= t <= 99 for t in terms):
            break
    gold = terms[-1]
    near = [gold + 1, gold - 1, gold + step, gold + 10, gold - 10, terms[-2], gold + 2 * step]
    wrong = _wrong_answers(rng, str(gold), [str(n) for n in near if n >= 0], lambda: str(rng.randint(0, 99)))
    return Instance("sequence", "SEQ " + ",".join(str(t) for t in terms[:-1]), str(gold), wrong)


def _copy(rng: random.Random) -> Instance:
    text = _word(rng, 3, 7, _ALNUM)
    return Instance("copy", f"CPY {text}", text, _near_misses(rng, text, _ALNUM))


_MAKERS: dict[str, Callable[[random.Random], Instance]] = {
    "add": _add,
    "reverse": _reverse,
    "sort": _sort,
    "recall": _recall,
    "sequence": _sequence,
    "copy": _copy,
}
assert tuple(_MAKERS) == SKILLS


def split_of(skill: str, body: str) -> str:
    """The split that owns the instance `(skill, body)`, from a stable hash (the same on every machine and seed).

    Example: `split_of("add", "ADD 12+7")` -> one of "eval", "sft_valid", "sft_train", "pretrain".
    """
    bucket = int.from_bytes(hashlib.blake2b(f"{skill}|{body}".encode(), digest_size=8).digest(), "big") % 100
    return next(name for name, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def _draw(rng: random.Random, skill: str, split: str, n: int, *, unique: bool, parameter: str) -> list[Instance]:
    """`n` instances of `skill` owned by `split` (rejection sampling); distinct bodies when `unique`."""
    drawn: list[Instance] = []
    seen: set[str] = set()
    misses = 0  # consecutive rejections; a long run means the split's part of the space is (nearly) used up
    while len(drawn) < n:
        if misses > _MAX_MISSES:
            raise ValueError(
                f"`{parameter}` needs {n} distinct {skill!r} instances but the {split!r} part of that skill's "
                f"instance space ran out after {len(drawn)}; use a smaller `{parameter}`"
            )
        instance = _MAKERS[skill](rng)
        if split_of(skill, instance.body) != split or (unique and instance.body in seen):
            misses += 1
            continue
        misses = 0
        seen.add(instance.body)
        drawn.append(instance)
    return drawn


def _per_skill(n: int, skills: tuple[str, ...]) -> dict[str, int]:
    """Split `n` over `skills` as evenly as possible (the first skills get the remainder)."""
    return {skill: n // len(skills) + (i < n % len(skills)) for i, skill in enumerate(skills)}


# ---------------------------------------------------------------------------------------------------------------------
# The corpus.


@dataclass(kw_only=True)
class DemoData:
    """The demo corpus: pretraining lines, SFT prompt/completion pairs and two evaluation sets.

    `eval_mc` items are `{"query", "choices" (4), "gold", "skill", "body"}`; `eval_em` items are
    `{"prompt", "answer", "skill", "body"}`. Both evaluation sets hold the same instances, in different orders.

    Example: `data = make_demo_data(seed=0); data.write("out/data")`.
    """

    pretrain_text: list[str] = field(default_factory=list)
    sft_train: list[dict] = field(default_factory=list)
    sft_valid: list[dict] = field(default_factory=list)
    eval_mc: list[dict] = field(default_factory=list)
    eval_em: list[dict] = field(default_factory=list)

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write pretrain.txt and the four .jsonl files into `out_dir` (created if missing); returns their paths.

        Example: `paths = data.write("out/data"); paths["pretrain"]` -> Path("out/data/pretrain.txt").
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {name: out_dir / file_name for name, file_name in _FILES.items()}
        paths["pretrain"].write_text("".join(line + "\n" for line in self.pretrain_text), encoding="ascii")
        for name in ("sft_train", "sft_valid", "eval_mc", "eval_em"):
            rows = getattr(self, name)
            paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="ascii")
        logger.info("wrote demo data to %s", out_dir)
        return paths

    @classmethod
    def read(cls, in_dir: str | Path) -> DemoData:
        """Read back what `write` wrote.

        Example: `data = DemoData.read("out/data")`.
        """
        in_dir = Path(in_dir)
        missing = [name for name in _FILES.values() if not (in_dir / name).is_file()]
        if missing:
            raise ValueError(f"`in_dir`={str(in_dir)!r} lacks the demo data files {missing}")
        pretrain = (in_dir / _FILES["pretrain"]).read_text(encoding="ascii").splitlines()
        jsonl = {
            name: [json.loads(line) for line in (in_dir / _FILES[name]).read_text(encoding="ascii").splitlines()]
            for name in ("sft_train", "sft_valid", "eval_mc", "eval_em")
        }
        return cls(pretrain_text=pretrain, **jsonl)


def _check_count(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")


def make_demo_data(
    *,
    seed: int = 0,
    n_pretrain: int = 20000,
    n_sft: int = 2000,
    n_valid: int = 200,
    n_eval: int = 300,
    skills: tuple[str, ...] = SKILLS,
    eval_split: str = "eval",
) -> DemoData:
    """Build the seeded synthetic corpus: every split balanced over `skills`, evaluation disjoint from training.

    Args:
        seed: seeds a private `random.Random`; the same seed gives the same corpus on any machine.
        n_pretrain: pretraining lines (raw text, instances may repeat).
        n_sft: SFT training pairs (instances may repeat).
        n_valid: held-out SFT pairs (distinct instances).
        n_eval: evaluation items, in each of `eval_mc` and `eval_em` (distinct instances, the same in both).
        skills: a non-empty subset of `SKILLS`.
        eval_split: where the evaluation items come from: "eval" (the held-out evaluation partition, for reported
            runs) or "sft_valid" (the validation partition, for tuning a recipe without seeing evaluation items).

    Example: `data = make_demo_data(seed=1, n_pretrain=1000); data.eval_em[0]` -> {"prompt": "Q:...? A:", ...}.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"`seed` must be an integer, got {seed!r}")
    for name, value in (("n_pretrain", n_pretrain), ("n_sft", n_sft), ("n_valid", n_valid), ("n_eval", n_eval)):
        _check_count(name, value, 0)
    skills = tuple(skills)
    if not skills or len(set(skills)) != len(skills) or not set(skills) <= set(SKILLS):
        raise ValueError(f"`skills` must be distinct names from {list(SKILLS)}, got {list(skills)}")

    if eval_split not in ("eval", "sft_valid"):
        raise ValueError(f"`eval_split` must be 'eval' or 'sft_valid', got {eval_split!r}")
    rng = random.Random(seed)

    def instances(split: str, n: int, *, unique: bool, parameter: str) -> list[Instance]:
        drawn = [
            instance
            for skill, count in _per_skill(n, skills).items()
            for instance in _draw(rng, skill, split, count, unique=unique, parameter=parameter)
        ]
        rng.shuffle(drawn)
        return drawn

    pretrain = instances("pretrain", n_pretrain, unique=False, parameter="n_pretrain")
    sft_train = instances("sft_train", n_sft, unique=False, parameter="n_sft")
    sft_valid = instances("sft_valid", n_valid, unique=True, parameter="n_valid")
    evaluation = instances(eval_split, n_eval, unique=True, parameter="n_eval")

    # Balanced gold positions (counts differ by at most one), in random order.
    gold_positions = [i % N_CHOICES for i in range(len(evaluation))]
    rng.shuffle(gold_positions)
    eval_mc = []
    for instance, gold in zip(evaluation, gold_positions, strict=True):
        choices = list(instance.distractors)
        choices.insert(gold, instance.answer)
        eval_mc.append(
            {
                "query": instance.prompt,
                "choices": choices,
                "gold": gold,
                "skill": instance.skill,
                "body": instance.body,
            }
        )
    eval_em = [
        {"prompt": instance.prompt, "answer": instance.answer, "skill": instance.skill, "body": instance.body}
        for instance in rng.sample(evaluation, len(evaluation))
    ]
    data = DemoData(
        pretrain_text=[instance.raw for instance in pretrain],
        sft_train=[{"prompt": instance.prompt, "completion": " " + instance.answer} for instance in sft_train],
        sft_valid=[{"prompt": instance.prompt, "completion": " " + instance.answer} for instance in sft_valid],
        eval_mc=eval_mc,
        eval_em=eval_em,
    )
    logger.info(
        "demo data (seed %d, skills %s): %d pretraining lines, %d/%d SFT train/valid, %d evaluation items",
        seed, ",".join(skills), len(data.pretrain_text), len(data.sft_train), len(data.sft_valid), len(eval_mc),
    )  # fmt: skip
    return data
