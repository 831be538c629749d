"""Turn validated task items into model requests: (context, continuation) pairs or generation prompts.

Few-shot examples are other items of the same file, drawn with a fixed seed per item (see `few_shot_indices`);
each is written in the task's own format and separated by a blank line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from phds.evaluation.tasks import Task, few_shot_indices, gold_number

GSM8K_STOPS = ("\n\n", "Question:")
EXACT_MATCH_STOPS = ("\n",)


@dataclass
class ItemRequests:
    """What the model is asked for one item.

    Attributes:
        pairs: (context, continuation) strings to score (one per choice; one for LAMBADA).
        gold: gold choice index, or the gold answer string for generation tasks.
        prompt: the generation prompt (generation tasks only).
        stops: strings that end a generation.
    """

    pairs: list[tuple[str, str]] = field(default_factory=list)
    gold: int | str | None = None
    prompt: str = ""
    stops: tuple[str, ...] = ()


def _shot(task: Task, item: dict) -> str:
    kind = task.kind
    if kind == "mc":
        return f"{item['query']} {item['choices'][item['gold']]}"
    if kind == "winogrande":
        return f"{item['context_options'][item['gold']]} {item['continuation']}"
    if kind == "lambada":
        return f"{item['context']} {item['continuation']}"
    if kind == "gsm8k":
        return f"Question: {item['context']}\nAnswer: {item['chain_of_thought']} #### {item['answer']}"
    return f"{item['prompt']}{item['answer']}"


def build_requests(task: Task, count: int, *, num_fewshot: int = 0, seed: int = 0) -> list[ItemRequests]:
    """Requests for the first `count` items of `task`, few-shot examples drawn from all of its items.

    Example: `build_requests(load_task("copa"), 10, num_fewshot=2)[0].pairs`.
    """
    if num_fewshot < 0:
        raise ValueError(f"`num_fewshot` must be >= 0, got {num_fewshot}")
    if task.kind == "perplexity":
        raise ValueError("perplexity tasks are scored as token windows, not item requests")
    out = []
    for index, item in enumerate(task.items[:count]):
        shots = few_shot_indices(len(task.items), index, num_fewshot, seed)
        sep = "\n" if task.kind == "exact_match" else "\n\n"
        prefix = "".join(_shot(task, task.items[i]) + sep for i in shots)
        kind = task.kind
        if kind == "mc":
            out.append(
                ItemRequests(pairs=[(prefix + item["query"], " " + c) for c in item["choices"]], gold=item["gold"])
            )
        elif kind == "winogrande":
            cont = " " + item["continuation"]
            out.append(ItemRequests(pairs=[(prefix + c, cont) for c in item["context_options"]], gold=item["gold"]))
        elif kind == "lambada":
            out.append(ItemRequests(pairs=[(prefix + item["context"], " " + item["continuation"])]))
        elif kind == "gsm8k":
            prompt = f"{prefix}Question: {item['context']}\nAnswer:"
            out.append(ItemRequests(prompt=prompt, gold=gold_number(item["answer"]), stops=GSM8K_STOPS))
        else:
            out.append(
                ItemRequests(prompt=prefix + item["prompt"], gold=str(item["answer"]).strip(), stops=EXACT_MATCH_STOPS)
            )
    return out
