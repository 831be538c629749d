"""The lm-eval adapter, fully offline: a local YAML task over a jsonl file and a tiny checkpoint in a tmp dir."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import phds
from phds.evaluation import scoring

from .conftest import MC, write_jsonl

lm_eval = pytest.importorskip("lm_eval")

TASK_YAML = """task: phds_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def offline_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    items = write_jsonl(root / "items.jsonl", MC)
    (root / "tasks").mkdir()
    (root / "tasks" / "phds_tiny_mc.yaml").write_text(TASK_YAML.format(path=items))
    phds.save(phds.tiny_model("olmoe"), root / "ckpt", tokenizer=phds.tiny_tokenizer())
    return root


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    import datasets.config

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


def _hand_scores(k: int) -> list[list[float]]:
    """What lm-eval should report at k: log p(" choice" | query) from our own scorer, dialled to k."""
    model, tok = phds.tiny_model("olmoe"), phds.tiny_tokenizer()
    requests = [(tok(item["query"]).input_ids, tok(" " + c).input_ids) for item in MC for c in item["choices"]]
    with phds.sparsity(model, k):
        flat = [s.logprob for s in scoring.loglikelihoods(model, requests)]
    sizes = [len(item["choices"]) for item in MC]
    return [flat[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(len(sizes))]


def _run_tiny_task(offline_setup, model, **kwargs) -> tuple[dict, list[dict]]:
    """lm-eval's `simple_evaluate` on the tiny multiple-choice task (offline: only our include path is indexed);
    returns its output and the logged samples in document order."""
    from lm_eval.tasks import TaskManager

    import phds.evaluation.lm_eval_adapter  # noqa: F401  (registers "phds")

    out = lm_eval.simple_evaluate(
        model=model,
        tasks=["phds_tiny_mc"],
        task_manager=TaskManager(include_path=str(offline_setup / "tasks"), include_defaults=False),
        log_samples=True,
        **kwargs,
    )
    return out, sorted(out["samples"]["phds_tiny_mc"], key=lambda s: s["doc_id"])


def _choice_scores(samples: list[dict]) -> list[list[float]]:
    return [[resp[0] for resp in s["filtered_resps"]] for s in samples]


def test_simple_evaluate_scores_at_the_requested_k(offline_setup):
    out, samples = _run_tiny_task(
        offline_setup,
        "phds",
        model_args=f"pretrained={offline_setup / 'ckpt'},k=1,device=cpu,dtype=float32",
        batch_size=2,
    )
    got = _choice_scores(samples)
    at_1, at_4 = _hand_scores(1), _hand_scores(4)
    assert got == [pytest.approx(row, abs=1e-4) for row in at_1]
    assert got != [pytest.approx(row, abs=1e-6) for row in at_4]
    assert "acc,none" in out["results"]["phds_tiny_mc"]


def test_bad_k_is_rejected(offline_setup):
    from phds.evaluation.lm_eval_adapter import PHDSLM

    with pytest.raises(ValueError, match="`k` must be a positive int, got k='two'"):
        PHDSLM(pretrained=str(offline_setup / "ckpt"), k="two", device="cpu")
    with pytest.raises(ValueError, match=r"`k` must be between 1 and the model's number of experts \(8\), got k=9"):
        PHDSLM(pretrained=str(offline_setup / "ckpt"), k=9, device="cpu")


@pytest.mark.slow  # lm-eval's command line indexes every task it ships before running ours
def test_phds_lm_eval_forwards_to_the_lm_eval_command_line(offline_setup, tmp_path):
    from phds.cli import app

    result = CliRunner().invoke(
        app,
        [
            "lm-eval",
            "--model",
            "phds",
            "--model_args",
            f"pretrained={offline_setup / 'ckpt'},k=2",
            "--device",
            "cpu",
            "--tasks",
            "phds_tiny_mc",
            "--include_path",
            str(offline_setup / "tasks"),
            "--batch_size",
            "2",
            "--output_path",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "out").rglob("results*.json"))


def _bos_adding_tokenizer():
    """The tiny tokenizer with a Llama-style post-processor: bos before every encoded text."""
    from tokenizers import processors

    tok = phds.tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[(tok.bos_token, tok.bos_token_id)]
    )
    return tok


@pytest.mark.parametrize("tokenizer", [phds.tiny_tokenizer, _bos_adding_tokenizer], ids=["no-bos", "adds-bos"])
def test_phds_eval_and_lm_eval_give_the_same_loglikelihoods_and_accuracy(offline_setup, tmp_path, tokenizer):
    from phds.evaluation.lm_eval_adapter import PHDSLM

    model, tok = phds.tiny_model("olmoe"), tokenizer()
    ours = phds.evaluate(
        model, [2], [offline_setup / "items.jsonl"], tokenizer=tok, out_dir=tmp_path, latency=False, progress=False
    )
    ours_rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    theirs, samples = _run_tiny_task(
        offline_setup, PHDSLM(pretrained=model, tokenizer=tok, k=2, batch_size=1, dtype="float32")
    )
    assert len(samples) == len(ours_rows) == len(MC)
    for row, scores, sample in zip(
        sorted(ours_rows, key=lambda r: r["index"]), _choice_scores(samples), samples, strict=True
    ):
        assert row["logprobs"] == pytest.approx(scores, abs=1e-5)
        assert float(row["prediction"] == row["gold"]) == sample["acc"]
    ours_acc = ours["tasks"]["items"]["items"]["2"]["acc"]
    assert sum(ours_acc) / len(ours_acc) == pytest.approx(theirs["results"]["phds_tiny_mc"]["acc,none"])


@pytest.mark.parametrize("tokenizer", [phds.tiny_tokenizer, _bos_adding_tokenizer], ids=["no-bos", "adds-bos"])
def test_generation_prompts_are_tokenised_as_lm_eval_generate_until_does(tiny, tokenizer):
    from phds.evaluation.lm_eval_adapter import PHDSLM

    model, tok = tiny[0], tokenizer()
    lm = PHDSLM(pretrained=model, tokenizer=tok, k=2, batch_size=1, dtype="float32")
    for prompt in ["Question: 2 plus 3?\nAnswer:", "<s>1+1="]:
        ids, _ = lm.tok_batch_encode([prompt])
        assert scoring.encode_text(tok, prompt) == ids[0].tolist()


def test_tiny_models_are_accepted_as_everywhere_else(offline_setup):
    _, samples = _run_tiny_task(offline_setup, "phds", model_args="pretrained=tiny:olmoe,k=1,device=cpu", batch_size=2)
    got = _choice_scores(samples)
    assert got == [pytest.approx(row, abs=1e-4) for row in _hand_scores(1)]


@pytest.mark.parametrize(
    ("pretrained", "device", "message"),
    [
        ("./no/such/checkpoint", "cpu", "no such directory"),
        ("nobody-phds/never-published", "cpu", "not in the local cache while offline"),
        ("tiny:olmoe", "banana", "`device` must be"),
    ],
)
def test_a_bad_model_or_device_is_one_line_before_any_work(pretrained, device, message):
    from phds.evaluation.lm_eval_adapter import PHDSLM

    with pytest.raises((ValueError, FileNotFoundError), match=message):
        PHDSLM(pretrained=pretrained, k=1, device=device)


def test_phds_lm_eval_help_explains_the_model_and_k(monkeypatch):
    import lm_eval.__main__

    from phds.cli import app

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: None)  # lm-eval's own help follows ours
    result = CliRunner().invoke(app, ["lm-eval", "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "pretrained=MODEL,k=K" in text and "tiny:<family>" in text and "experts per token" in text


def test_phds_lm_eval_errors_are_one_line(monkeypatch):
    import lm_eval.__main__

    from phds.cli import app

    def fails():
        raise ValueError("`k` must be a positive int, got k='two'")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", fails)
    result = CliRunner().invoke(app, ["lm-eval", "--model", "phds"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: `k` must be a positive int, got k='two'"


def test_the_adapter_checks_the_sidecar_against_the_model(tmp_path):
    from phds.evaluation.lm_eval_adapter import PHDSLM

    phds.save(phds.tiny_model("olmoe"), tmp_path / "ckpt", tokenizer=phds.tiny_tokenizer())
    (tmp_path / "ckpt" / "phds.json").write_text(json.dumps({"ks": [2, 9], "k_pre": 4}))
    with pytest.raises(ValueError, match=r"phds\.json.*`ks`.*\[9\] too large"):
        PHDSLM(pretrained=str(tmp_path / "ckpt"), k=2, device="cpu")
