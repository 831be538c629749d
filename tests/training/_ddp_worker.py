"""One rank of the 2-process test: a tiny PHDS run under torchrun (gloo, CPU); writes what k this rank used."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

import phds
from phds.training import PHDSConfig, train

ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(8) for b in range(8)]


class _RecordRoutedK(TrainerCallback):
    """Every MoE layer's routed k at every training forward on this rank: one `[k of layer 0, k of layer 1, ...]`
    per forward (micro-batch)."""

    def __init__(self):
        self.forward_ks: list[list[int]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = phds.moe_layers(model)
        layers[0].router.register_forward_hook(self._hook(layers))

    def _hook(self, layers):
        def hook(module, inputs, output):
            if module.training:  # layer 0 routes first; the dial set every layer's k before the forward
                self.forward_ks.append([layer.router.top_k for layer in layers])

        return hook


def main(out: str, record_dir: str, k_sampling: str) -> None:
    torch.set_num_threads(1)
    recorder = _RecordRoutedK()
    config = PHDSConfig(
        output_dir=out,
        ks=[1, 2, 3, 4],
        k_sampling=k_sampling,
        anchor_fraction=0.25,
        max_steps=4,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        max_length=16,
        eval_steps=2,
        save_strategy="no",
        eval_fraction=0.125,
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        optim="adamw_torch",
        use_cpu=True,
        ddp_backend="gloo",
        seed=0,
    )
    result = train("tiny:olmoe", config, train_data=ROWS, callbacks=[recorder])
    rank = int(os.environ["RANK"])
    record = {
        "rank": rank,
        "world_size": int(os.environ["WORLD_SIZE"]),
        "k_history": [{str(i): k for i, k in ks.items()} if isinstance(ks, dict) else ks for ks in result.k_history],
        "forward_ks": recorder.forward_ks,
        "validation_loss": {str(k): v for k, v in result.validation_loss.items()},
    }
    Path(record_dir, f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
