"""Recipe: PHDS on Qwen1.5-MoE-A2.7B (60 routed experts + shared experts, k_pre = 4) over K = {2, 3, 4}, anchor 2.

    accelerate launch --config_file recipes/accelerate/fsdp_8gpu.yaml recipes/qwen_moe.py --out runs/qwen-phds
    accelerate launch --config_file recipes/accelerate/fsdp_8gpu.yaml recipes/qwen_moe.py --out runs/qwen-k2 --fixed-k 2

Same recipe as `recipes/olmoe.py` (a starting point, not a tuned reproduction); only the model and K differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the shared recipe sits beside it

from tulu3_sft import run, tulu3_config  # noqa: E402

from phds.training import PHDSConfig  # noqa: E402

MODEL = "Qwen/Qwen1.5-MoE-A2.7B"


def qwen_moe_phds(output_dir: str, *, fixed_k: int | None = None, lora: bool = False, num_gpus: int = 8) -> PHDSConfig:
    """The Qwen1.5-MoE recipe's config: PHDS over 2..4 (or a fixed-k oracle with the identical recipe).

    Example: `train(MODEL, qwen_moe_phds("runs/qwen-phds"), train_data=DATA)`.
    """
    return tulu3_config(output_dir, ks=[2, 3, 4], fixed_k=fixed_k, lora=lora, num_gpus=num_gpus)


if __name__ == "__main__":
    run(MODEL, "PHDS / oracle SFT of Qwen1.5-MoE-A2.7B on Tulu-3", qwen_moe_phds)
