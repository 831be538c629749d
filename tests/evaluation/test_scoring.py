from __future__ import annotations

import pytest
import torch
from tokenizers import processors

import phds
from phds.evaluation import scoring
from phds.evaluation.prompts import build_requests
from phds.evaluation.runner import _windows
from phds.evaluation.tasks import load_task


def _by_hand(model, ctx: list[int], cont: list[int]) -> float:
    """Sum of log p(cont_t | everything before) from one unbatched forward, written out position by position."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(ctx) - 1 + t, token]) for t, token in enumerate(cont))


def test_loglikelihoods_match_a_hand_computation(tiny):
    model, tok = tiny
    pairs = [("Q: 1+1?", " 2"), ("Hi", " you all"), ("", "abc")]
    requests = [scoring.encode_pair(tok, c, x, 256) for c, x in pairs]
    assert requests[0][1] == tok(" 2", add_special_tokens=False).input_ids
    assert requests[2][0] == [tok.bos_token_id]  # an empty context becomes bos
    scored = scoring.loglikelihoods(model, requests, batch_size=3)
    for (ctx, cont), s in zip(requests, scored, strict=True):
        assert s.logprob == pytest.approx(_by_hand(model, ctx, cont), abs=1e-4)
        assert s.n_tokens == len(cont) and len(s.argmax) == len(cont)


def test_trailing_context_space_moves_to_the_continuation(tiny):
    _, tok = tiny
    ctx, cont = scoring.encode_pair(tok, "ab ", "c", 256)
    assert tok.decode(cont) == " c" and tok.decode(ctx) == "ab"


def _ids(text: str, tok) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def _bos_adding_tokenizer():
    """The tiny tokenizer with a Llama-style post-processor: bos before every encoded text."""
    tok = phds.tiny_tokenizer()
    bos = (tok.bos_token, tok.bos_token_id)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[bos]
    )
    return tok


def test_context_gets_bos_only_where_the_tokenizer_adds_it(tiny):
    _, plain = tiny
    ctx, cont = scoring.encode_pair(plain, "Q: 1+1?", " 2", 256)
    assert ctx == plain("Q: 1+1?", add_special_tokens=False).input_ids and plain.bos_token_id not in ctx + cont
    adds_bos = _bos_adding_tokenizer()
    ctx, cont = scoring.encode_pair(adds_bos, "Q: 1+1?", " 2", 256)
    assert ctx[0] == adds_bos.bos_token_id and ctx[1:] == _ids("Q: 1+1?", adds_bos)
    assert cont == _ids(" 2", adds_bos)


def test_add_bos_token_forces_or_drops_bos_and_a_written_bos_is_not_doubled(tiny):
    _, plain = tiny
    bos = plain.bos_token_id
    assert scoring.encode_pair(plain, "ab", " c", 256, add_bos_token=True)[0] == [bos, *_ids("ab", plain)]
    assert scoring.encode_pair(_bos_adding_tokenizer(), "ab", " c", 256, add_bos_token=False)[0] == _ids("ab", plain)
    assert scoring.encode_pair(_bos_adding_tokenizer(), "<s>ab", " c", 256)[0] == [bos, *_ids("ab", plain)]
    assert scoring.encode_pair(plain, "<s>ab", " c", 256, add_bos_token=True)[0] == [bos, *_ids("ab", plain)]


def test_empty_context_is_the_prefix_token_unless_the_continuation_starts_with_it(tiny):
    _, tok = tiny
    bos = tok.bos_token_id
    assert scoring.encode_pair(tok, "", "abc", 256) == ([bos], _ids("abc", tok))
    assert scoring.encode_pair(tok, "", "<s>abc", 256) == ([bos], _ids("abc", tok))
    with pytest.raises(ValueError, match="leaves nothing to score"):
        scoring.encode_pair(tok, "", "<s>", 256)


def test_a_pair_keeps_limit_plus_one_tokens_since_the_last_is_never_fed():
    assert scoring.truncate([1, 2, 3], [4], 3) == ([1, 2, 3], [4])
    assert scoring.truncate([1, 2, 3], [4, 5], 3) == ([2, 3], [4, 5])
    assert scoring.truncate([1, 2], [3, 4, 5, 6], 3) == ([2], [3, 4, 5])


def test_generation_prompts_get_bos_only_where_the_tokenizer_adds_it(tiny):
    model, plain = tiny
    adds_bos = _bos_adding_tokenizer()
    assert scoring.encode_text(plain, "1+1=") == _ids("1+1=", plain)
    assert scoring.encode_text(adds_bos, "1+1=") == [adds_bos.bos_token_id, *_ids("1+1=", plain)]
    assert scoring.encode_text(adds_bos, "<s>1+1=") == scoring.encode_text(adds_bos, "1+1=")
    assert scoring.generate(model, adds_bos, ["<s>1+1="], max_new_tokens=4) == scoring.generate(
        model, adds_bos, ["1+1="], max_new_tokens=4
    )


def test_batched_scores_equal_batch_size_one(tiny, task_dir):
    model, tok = tiny
    requests = []
    for name in ("mc", "wino", "lamb"):
        for item in build_requests(load_task(task_dir / f"{name}.jsonl"), 10):
            requests += [scoring.encode_pair(tok, c, x, 256) for c, x in item.pairs]
    single = scoring.loglikelihoods(model, requests, batch_size=1)
    batched = scoring.loglikelihoods(model, requests, batch_size=5)
    for a, b in zip(single, batched, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert a.argmax == b.argmax and a.greedy == b.greedy


def test_batched_scores_equal_batch_size_one_with_per_row_routing_too(tiny, task_dir):
    """A tensor k routes at k_max and zeroes dropped slots; padding must not leak through that path either."""
    model, tok = tiny
    requests = [
        scoring.encode_pair(tok, c, x, 256)
        for item in build_requests(load_task(task_dir / "mc.jsonl"), 10)
        for c, x in item.pairs
    ]
    with phds.sparsity(model, 2, epsilon=1e-9):
        single = scoring.loglikelihoods(model, requests, batch_size=1)
        batched = scoring.loglikelihoods(model, requests, batch_size=4)
    assert [s.logprob for s in single] == pytest.approx([b.logprob for b in batched], abs=1e-4)


def test_left_padded_generation_equals_batch_size_one(tiny):
    model, tok = tiny
    prompts = ["1+1=", "Question: what is two plus three?\nAnswer:", "ab"]
    single = scoring.generate(model, tok, prompts, max_new_tokens=6, batch_size=1)
    batched = scoring.generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    assert single == batched and all(isinstance(t, str) for t in single)


def test_generation_is_cut_at_the_first_stop_string():
    assert scoring.cut_at("12\nQuestion: next", ["\n\n", "Question:"]) == "12\n"
    assert scoring.cut_at("12\nmore", ["\n"]) == "12"


def test_perplexity_windows_score_every_token_but_the_first_exactly_once(tiny):
    _, tok = tiny
    text = "abcdefghij" * 5
    windows = _windows(tok, text, window=16, stride=8, limit=None)
    ids = tok(text, add_special_tokens=False).input_ids
    scored = [t for _, cont in windows for t in cont]
    assert scored == ids[1:]
    assert all(len(ctx) + len(cont) <= 16 for ctx, cont in windows)
    assert all(len(ctx) >= 8 for ctx, _ in windows[1:])  # later windows keep at least stride tokens of context
    assert len(_windows(tok, text, window=16, stride=8, limit=2)) == 2
