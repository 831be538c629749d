"""An lm-evaluation-harness model: HFLM with the k dial, registered as `phds` (model arg `k`).

Importing this module registers the model (lm-eval 0.4.x has no plugin discovery for external models), after which
lm-eval's own Python API and CLI can use it:

    import phds.evaluation.lm_eval_adapter  # registers "phds"
    lm_eval.simple_evaluate(model="phds", model_args="pretrained=out/phds,k=2", tasks=["arc_easy"])

or from the shell: `phds lm-eval --model phds --model_args pretrained=out/phds,k=2 --tasks arc_easy`.
Following lm-eval's `hf_steered.py`, `_model_call` and `_model_generate` run inside `phds.sparsity(model, k)`, so
the wrapped model's own k is untouched between calls.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("the lm-eval adapter needs lm-eval: pip install 'moe-phds[lm-eval]'") from error

from phds import dial
from phds.loading import TINY_PREFIX, check_model_source, load, resolve_device
from phds.sidecar import check_k, read_sidecar

logger = logging.getLogger(__name__)


def _parse_k(k: int | str | None) -> int | None:
    """`k` as lm-eval passes it (an int, or digits from `--model_args`), checked like a declared k; None if absent."""
    if k is None or k == "":
        return None
    if isinstance(k, str) and k.strip().isdigit():
        k = int(k)
    return check_k(k)


@register_model("phds")
class PHDSLM(HFLM):
    """HFLM whose forward passes and generations run at experts-per-token `k`.

    Args:
        pretrained: checkpoint path / hub name (or a loaded model), as for HFLM.
        k: experts per token; default: the sidecar's `default_k`, else the checkpoint's k_pre.
        **kwargs: forwarded to HFLM (batch_size, device, dtype, max_length, ...).

    Example: `PHDSLM(pretrained="out/phds", k=2, device="cpu")`.
    """

    def __init__(self, pretrained, k: int | str | None = None, **kwargs):
        requested = _parse_k(k)  # a malformed k fails before the model is loaded
        sidecar = None
        if isinstance(pretrained, str):
            # One line before any work for a missing directory, a bad device or an unreachable hub; `tiny:<family>`
            # (which transformers cannot resolve) is built by phds and handed to HFLM as a loaded model.
            check_model_source(pretrained)
            if "device" in kwargs and kwargs["device"] is not None:
                resolve_device(kwargs["device"])
            path = Path(pretrained).expanduser()
            if path.is_dir():
                sidecar = read_sidecar(path)  # a malformed file fails before the model is loaded
            if pretrained.startswith(TINY_PREFIX):
                model, tokenizer = load(pretrained, device=kwargs.pop("device", None), dtype="float32")
                kwargs["tokenizer"] = kwargs.get("tokenizer") or tokenizer
                pretrained = model
        super().__init__(pretrained=pretrained, **kwargs)
        if sidecar is not None:  # the same checks as `phds.load`: the sidecar's ks and k_pre against the model
            sidecar = read_sidecar(path, model=self.model)
        if requested is None:
            requested = sidecar.default_k if sidecar is not None else dial.k_pre(self.model)
        check_k(requested, num_experts=dial.num_experts(self.model))
        if sidecar is not None and requested not in sidecar.ks:
            logger.warning("k=%d is not among the checkpoint's declared ks %s", requested, sidecar.ks)
        self.k = requested

    def _model_call(self, *args, **kwargs):
        with dial.sparsity(self.model, self.k):
            return super()._model_call(*args, **kwargs)

    def _model_generate(self, *args, **kwargs):
        with dial.sparsity(self.model, self.k):
            return super()._model_generate(*args, **kwargs)


HELP = """phds lm-eval: lm-evaluation-harness with the `phds` model registered.

  phds lm-eval --model phds --model_args pretrained=MODEL,k=K --tasks TASKS [lm-eval options]

  MODEL  a checkpoint directory, a hub name, or tiny:<family> (e.g. tiny:olmoe)
  k      experts per token (1 .. the model's expert count); default: the phds.json default k, else k_pre
         (one k per run: repeat the command for each k)

lm-eval's own options follow.
"""


def run_cli(argv: Sequence[str]) -> None:
    """Run lm-eval's command line with `argv` (everything after `lm-eval`), the `phds` model registered.

    Example: `run_cli(["--model", "phds", "--model_args", "pretrained=out,k=2", "--tasks", "arc_easy"])`.
    """
    from lm_eval.__main__ import cli_evaluate

    if any(arg in ("-h", "--help") for arg in argv):
        print(HELP)
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
