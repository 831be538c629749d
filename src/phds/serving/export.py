"""`phds export`: a plain checkpoint whose `num_experts_per_tok` is one chosen k, for engines that fix k at load.

vLLM, SGLang and llama.cpp read `num_experts_per_tok` once when they load a model. Exporting writes the same weights
with that field set to k, so any of them serves the model at k with no PHDS code; for vLLM the same effect without
a copy is `--hf-overrides '{"num_experts_per_tok": k}'`, which `vllm_overrides` spells out.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from phds import dial
from phds.checkpoint import write_checkpoint
from phds.loading import load
from phds.sidecar import Sidecar, check_k, sidecar_of

logger = logging.getLogger(__name__)


def vllm_overrides(k: int) -> str:
    """The vLLM flag that loads an unexported checkpoint at `k`.

    Example: `vllm_overrides(4) == '--hf-overrides \\'{"num_experts_per_tok": 4}\\''`.
    """
    return f"--hf-overrides '{json.dumps({'num_experts_per_tok': k})}'"


def export(
    model: str | os.PathLike,
    k: int,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a plain safetensors checkpoint whose config says `num_experts_per_tok = k`.

    The tokenizer is copied, and a `phds.json` with `method="base"` and `ks=[k]` records where it came from (so
    `phds.load` of the export dials nothing). Written by `phds.checkpoint.write_checkpoint`: a 0755 folder staged
    beside `out_dir` and swapped in with renames, so a failure leaves any previous `out_dir` intact.

    Args:
        model: checkpoint directory, hub name or `tiny:<family>`.
        k: experts per token of the export; must be in [1, experts per layer] (a warning if not declared).
        out_dir: the new checkpoint directory.
        dtype: "auto" keeps the checkpoint's dtype.
        trust_remote_code: allow the checkpoint's own modelling code (off by default).
        overwrite: replace an existing `out_dir`.

    Example: `phds.serving.export("out/olmoe-phds", 4, "out/olmoe-k4")`.
    """
    check_k(k)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"`out_dir` {out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    loaded, tokenizer = load(model, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    check_k(k, num_experts=dial.num_experts(loaded))
    source = sidecar_of(loaded)
    if source is not None and k not in source.ks:
        logger.warning("k=%d is not among the checkpoint's declared ks %s", k, source.ks)
    k_pre = dial.k_pre(loaded)
    # An int k sets the routers' top_k and config.num_experts_per_tok: exactly a model built at k.
    dial.set_k(loaded, k)
    if getattr(loaded.config.get_text_config(), "num_experts_per_tok", None) != k:
        raise TypeError(
            f"{type(loaded).__name__} keeps its top-k outside `num_experts_per_tok`; it cannot be "
            "exported at a fixed k"
        )
    sidecar = Sidecar(
        ks=[k],
        k_pre=k,
        default_k=k,
        method="base",
        made_by={
            "exported_by": "phds export",
            "source": str(model),
            "source_k_pre": k_pre,
            "source_ks": source.ks if source is not None else None,
            "source_method": source.method if source is not None else None,
        },
    )
    write_checkpoint(loaded, out_dir, tokenizer=tokenizer, sidecar=sidecar)
    logger.info("exported %s at k=%d to %s", model, k, out_dir)
    return out_dir
