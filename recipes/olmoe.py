"""Recipe: PHDS on OLMoE-1B-7B-0125 (64 experts, k_pre = 8) over K = {4, ..., 8}, anchor 4, on Tulu-3 SFT.

A recipe is a function returning a PHDSConfig (the CLI flags are the same fields). For 8 GPUs:

    accelerate launch --config_file recipes/accelerate/fsdp_8gpu.yaml recipes/olmoe.py --out runs/olmoe-phds
    accelerate launch --config_file recipes/accelerate/fsdp_8gpu.yaml recipes/olmoe.py --out runs/olmoe-k4 --fixed-k 4

The hyperparameters are a sensible SFT starting point (effective batch 128 sequences of up to 4096 tokens, one
epoch, cosine schedule), not a tuned reproduction; adjust `max_steps`/batch to your budget.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the shared recipe sits beside it

from tulu3_sft import run, tulu3_config  # noqa: E402

from phds.training import PHDSConfig  # noqa: E402

MODEL = "allenai/OLMoE-1B-7B-0125"


def olmoe_phds(output_dir: str, *, fixed_k: int | None = None, lora: bool = False, num_gpus: int = 8) -> PHDSConfig:
    """The OLMoE recipe's config: PHDS over 4..8 (or a fixed-k oracle with the identical recipe).

    Example: `train(MODEL, olmoe_phds("runs/olmoe-phds"), train_data=DATA)`.
    """
    return tulu3_config(output_dir, ks=[4, 5, 6, 7, 8], fixed_k=fixed_k, lora=lora, num_gpus=num_gpus)


if __name__ == "__main__":
    run(MODEL, "PHDS / oracle SFT of OLMoE-1B-7B-0125 on Tulu-3", olmoe_phds)
