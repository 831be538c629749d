"""Calibration data: rows read and tokenised as `phds train` reads them, batched for measuring a model on them.

Used to fit something to a budget without touching evaluation items: `phds allocate` (calibration loss per
per-layer k) and `phds.calibrate` (a routing policy's mean active experts). Rows are read and checked by
`phds.training.data` and tokenised by TRL's SFTTrainer rules: eos appended to a text or a completion, loss on the
completion only for prompt/completion rows, chat rows through the chat template.

Shape suffixes: B rows, S sequence positions, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from phds.training.data import DataSource, read_rows, select_columns

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids_BS, attention_mask_BS, labels_BS


def _encode(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row, as TRL's SFTTrainer tokenises it for `phds train` (-100: no loss)."""
    eos = tokenizer.eos_token or ""
    if "messages" in row:
        ids = list(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"])
        return ids, list(ids)
    if "prompt" in row:
        completion = row["completion"] if row["completion"].endswith(eos) else row["completion"] + eos
        prompt_ids = tokenizer(text=row["prompt"]).input_ids
        ids = tokenizer(text=row["prompt"] + completion).input_ids
        # The completion starts where the two tokenisations diverge (BPE merges across the boundary), as in TRL.
        start = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids, strict=False)) if a != b), len(prompt_ids))
        return ids, [-100] * start + ids[start:]
    text = row["text"] if row["text"].endswith(eos) else row["text"] + eos
    ids = tokenizer(text=text).input_ids
    return ids, list(ids)


def calibration_batches(
    tokenizer, data: DataSource | list[str], *, max_length: int, batch_size: int, device, max_rows: int | None = None
) -> list[Batch]:
    """Right-padded `(input_ids_BS, attention_mask_BS, labels_BS)` batches of the calibration rows.

    Rows are read and checked by `phds.training.data` (a .jsonl/.json/.parquet/.csv/.txt file, a `datasets`
    name, a Dataset, a list of dicts or a list of texts), the first `max_rows` kept, and truncated to `max_length`
    tokens, keeping the start as training does.

    Example: `calibration_batches(tok, "calib.jsonl", max_length=512, batch_size=8, device="cpu")`.
    """
    if isinstance(data, list) and data and all(isinstance(text, str) for text in data):
        data = [{"text": text} for text in data]
    rows = select_columns(read_rows(data, what="data"), what="data")
    if max_rows is not None:
        rows = rows.select(range(min(max_rows, len(rows))))
    encoded = [_encode(tokenizer, row) for row in rows]
    encoded = [(ids[:max_length], labels[:max_length]) for ids, labels in encoded]
    # A row whose loss tokens all sit at position 0 predicts nothing (there is no token before the first).
    encoded = [(ids, labels) for ids, labels in encoded if any(label != -100 for label in labels[1:])]
    if not encoded:
        raise ValueError(
            f"`data` has no row with a token to predict after truncation to max_length={max_length}; "
            "give rows with at least two tokens"
        )
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    batches = []
    for first in range(0, len(encoded), batch_size):
        chunk = encoded[first : first + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids_BS = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chunk], device=device)
        mask_BS = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk], device=device)
        labels_BS = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in chunk], device=device)
        batches.append((ids_BS, mask_BS, labels_BS))
    return batches


@torch.no_grad()
def calibration_loss(model: nn.Module, batches: list[Batch]) -> float:
    """Mean next-token NLL over every loss token of `batches`, at the model's current k.

    Example: `with phds.sparsity(model, {0: 2, 1: 4}): calibration_loss(model, batches)`.
    """
    total, count = 0.0, 0
    for ids_BS, mask_BS, labels_BS in batches:
        logits_BSV = model(input_ids=ids_BS, attention_mask=mask_BS).logits
        targets = labels_BS[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits_BSV[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        count += int((targets != -100).sum())
    return total / count
