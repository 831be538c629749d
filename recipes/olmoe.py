"""Recipe: PHDS on OLMoE-1B-7B-0125 (64 experts, k_pre = 8) over K = {4, ..., 8}, anchor 4, on Tulu-3 SFT.

A recipe is a function returning a PHDSConfig (the CLI flags are the same fields). For 8 GPUs:

    accelerate launch --config_file recipes/accelerate/fsdp_8gpu.yaml recipes/olmoe.py --out runs/olmoe-phds
    accelerate launch --config_file recipes/accelerate/fsdp_8gpu.yaml recipes/olmoe.py --out runs/olmoe-k4 --fixed-k 4

The hyperparameters are a sensible SFT starting point (effective batch 128 sequences of up to 4096 tokens, one
epoch, cosine schedule), not a tuned reproduction; adjust `max_steps`/batch to your budget.
"""

from __future__ import annotations

import argparse

from phds.training import PHDSConfig, train

MODEL = "allenai/OLMoE-1B-7B-0125"
DATA = "allenai/tulu-3-sft-mixture"  # `messages` rows, formatted with the model's chat template


def olmoe_phds(output_dir: str, *, fixed_k: int | None = None, lora: bool = False, num_gpus: int = 8) -> PHDSConfig:
    """The OLMoE recipe's config: PHDS over 4..8 (or a fixed-k oracle with the identical recipe).

    Example: `train(MODEL, olmoe_phds("runs/olmoe-phds"), train_data=DATA)`.
    """
    per_device = 4
    return PHDSConfig(
        output_dir=output_dir,
        ks=None if fixed_k is not None else [4, 5, 6, 7, 8],
        anchor_k=None if fixed_k is not None else 4,
        anchor_fraction=0.06,
        fixed_k=fixed_k,
        select_by="k_pre",
        num_train_epochs=1,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=max(1, 128 // (per_device * num_gpus)),
        learning_rate=1e-4 if lora else 2e-5,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.0,
        max_length=4096,
        bf16=None,  # on where the GPU supports it (the default)
        activation_checkpointing=True,
        eval_steps=0.05,
        save_steps=0.05,
        eval_fraction=0.01,
        max_eval_samples=1024,
        logging_steps=10,
        lora=lora,
        lora_r=64,
        lora_alpha=128,
        seed=0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="PHDS / oracle SFT of OLMoE-1B-7B-0125 on Tulu-3")
    parser.add_argument("--out", required=True)
    parser.add_argument("--fixed-k", type=int, default=None)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    config = olmoe_phds(args.out, fixed_k=args.fixed_k, lora=args.lora)
    config.resume_from_checkpoint = "last" if args.resume else None
    train(MODEL, config, train_data=args.data)


if __name__ == "__main__":
    main()
