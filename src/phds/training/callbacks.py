"""Trainer callbacks of a PHDS run: dial k once per optimizer step, log it, show progress, keep the best checkpoint.

- `PHDSCallback` sets k at `on_step_begin`, the one point of an optimizer step before its first micro-batch's
  forward: every micro-batch of a gradient-accumulation step, and any forward recomputed by activation
  checkpointing, runs at the same k. Every rank computes k from the pure schedule, so ranks agree without talking.
  With layer-wise sampling the step's k is a `{layer_index: k}` dict; logs and the progress bar show its mean.
- `JsonlLogCallback` appends every log (per-step k, training loss, per-k validation loss) to a JSON-lines file.
- `RichProgressCallback` replaces transformers' tqdm bar on rank zero: step, k, loss, ETA.
- `BestCheckpointCallback` keeps the checkpoint with the best validation score and hands it to a save function.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState

from phds import checkpoint, dial
from phds.schedule import PHDSSchedule

logger = logging.getLogger(__name__)

LOG_NAME = "phds_log.jsonl"


def eval_loss_key(k: int) -> str:
    """The metric name of the validation loss at k (what `evaluate` returns and the loggers see).

    Example: `eval_loss_key(2) == "eval_loss_k2"`.
    """
    return f"eval_loss_k{k}"


def mean_k(k: int | dict[int, int]) -> int | float:
    """The k of a step as one number: the k itself, or the mean over layers of a per-layer k.

    Example: `mean_k({0: 2, 1: 3}) == 2.5`.
    """
    return sum(k.values()) / len(k) if isinstance(k, dict) else k


def truncate_log(path: str | Path, step: int) -> None:
    """Cut the JSON-lines log at `path` back to a run's state at optimizer step `step` (a resumed checkpoint's):
    keep the steps begun before it and the logs made up to it; rewritten atomically.

    Example: `truncate_log("out/phds_log.jsonl", 6)` keeps `{"event": "step", "step": 5, ...}`, drops step 6.
    """
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # the last line of a killed write
        entry_step = entry.get("step", 0)
        if entry_step < step or (entry_step == step and entry.get("event") != "step"):
            kept.append(line + "\n")
    staging = checkpoint.staging_path(path)
    staging.write_text("".join(kept))
    os.replace(staging, path)


class PHDSCallback(TrainerCallback):
    """Dial the schedule's k at the start of every optimizer step and record it.

    Args:
        schedule: the per-step k; `schedule.sampling == "layer"` dials a k per MoE layer.
        epsilon: weight of dropped experts (0 drops them).
        renormalize: override the router's renormalisation (None follows it).
        history_path: JSON-lines log of a previous attempt of this run; on resume the k of the steps already done
            are read back from it, so `k_history` covers the whole run.

    Attributes:
        k_history: what every step dialled: an int per step, or a `{layer_index: k}` dict per step with layer-wise
            sampling.
        current_k: what the current step dialled.

    Example: `trainer.add_callback(PHDSCallback(PHDSSchedule(ks=[2, 3, 4])))`.
    """

    def __init__(
        self,
        schedule: PHDSSchedule,
        *,
        epsilon: float = 0.0,
        renormalize: bool | None = None,
        history_path: str | Path | None = None,
    ) -> None:
        self.schedule = schedule
        self.epsilon = epsilon
        self.renormalize = renormalize
        self.history_path = Path(history_path) if history_path is not None else None
        self.k_history: list[int | dict[int, int]] = []
        self.current_k: int | dict[int, int] | None = None
        self.layers: list[int] | None = None
        self._k_before: int | dict | torch.Tensor | None = None

    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        self._k_before = dial.get_k(model)
        self.layers = [layer.index for layer in dial.moe_layers(model)]
        self.k_history = self._history_before(state.global_step, state.max_steps)

    def _history_before(self, resumed_step: int, total_steps: int) -> list[int | dict[int, int]]:
        """The k of steps [0, resumed_step): read from the previous attempt's log, else recomputed (pure schedule)."""
        if resumed_step == 0:
            return []
        logged: dict[int, int | dict[int, int]] = {}
        if self.history_path is not None and self.history_path.is_file():
            for line in self.history_path.read_text().splitlines():
                entry = json.loads(line)
                if entry.get("event") != "step" or entry["step"] >= resumed_step:
                    continue
                if self.schedule.sampling == "layer" and "layer_k" in entry:
                    logged[entry["step"]] = {int(layer): k for layer, k in entry["layer_k"].items()}
                elif self.schedule.sampling == "global" and "k" in entry and "layer_k" not in entry:
                    logged[entry["step"]] = entry["k"]
        missing = [step for step in range(resumed_step) if step not in logged]
        if missing:
            logger.warning("k of %d earlier steps not in the log; recomputing them from the schedule", len(missing))
        return [
            logged[step] if step in logged else self.schedule.dialled_at(step, total_steps, self.layers)
            for step in range(resumed_step)
        ]

    def on_step_begin(self, args, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        step = state.global_step
        if self.layers is None:
            self.layers = [layer.index for layer in dial.moe_layers(model)]
        k = self.schedule.dialled_at(step, state.max_steps, self.layers)
        dial.set_k(model, k, epsilon=self.epsilon, renormalize=self.renormalize)
        self.current_k = k
        del self.k_history[step:]  # a step begun twice (never in transformers today) is recorded once
        self.k_history.append(k)

    def on_log(self, args, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if logs is not None and self.current_k is not None and "loss" in logs:
            logs["k"] = mean_k(self.current_k)  # one number, for the trackers

    def on_train_end(self, args, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if self._k_before is not None and model is not None:
            dial.set_k(model, self._k_before)


class JsonlLogCallback(TrainerCallback):
    """Append one JSON line per optimizer step (`{"event": "step", "step", "k"}`) and per log (`{"event": "log",
    "step", ...}`) to `path`, on rank zero. The file is opened per write, so it survives being moved. With layer-wise
    sampling a step's `k` is the mean over layers and `layer_k` holds every layer's (`{"0": 2, "1": 4}`).

    Example: `JsonlLogCallback("out/phds_log.jsonl", phds_callback)`.
    """

    def __init__(self, path: str | Path, phds_callback: PHDSCallback) -> None:
        self.path = Path(path)
        self.phds_callback = phds_callback

    def _write(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")

    def on_step_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        k = self.phds_callback.current_k
        if state.is_world_process_zero and k is not None:
            entry = {"event": "step", "step": state.global_step, "k": mean_k(k)}
            if isinstance(k, dict):
                entry["layer_k"] = {str(layer): value for layer, value in sorted(k.items())}
            self._write(entry)

    def on_log(self, args, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            clean = {key: value for key, value in logs.items() if isinstance(value, (int, float, str))}
            self._write({"event": "log", "step": state.global_step, **clean})


class RichProgressCallback(TrainerCallback):
    """A rich progress bar on rank zero with the step, the current k (the mean over layers with layer-wise
    sampling), the last training loss and the ETA.

    Example: `trainer.add_callback(RichProgressCallback(phds_callback))`.
    """

    def __init__(self, phds_callback: PHDSCallback) -> None:
        self.phds_callback = phds_callback
        self.progress = None
        self.task = None
        self.loss: float | None = None

    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("k={task.fields[k]}"),
            TextColumn("loss={task.fields[loss]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=state.max_steps, completed=state.global_step, k="-", loss="-"
        )

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        if self.progress is not None:
            loss = "-" if self.loss is None else f"{self.loss:.4f}"
            k = self.phds_callback.current_k
            k = f"{mean_k(k):.2f} (layer mean)" if isinstance(k, dict) else k
            self.progress.update(self.task, completed=state.global_step, k=k, loss=loss)

    def on_log(self, args, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        if "loss" in logs:
            self.loss = float(logs["loss"])
            self.progress.update(self.task, loss=f"{self.loss:.4f}")
        losses = {key[len("eval_loss_k") :]: value for key, value in logs.items() if key.startswith("eval_loss_k")}
        if losses:
            text = ", ".join(f"k={k}: {value:.4f}" for k, value in losses.items())
            self.progress.console.print(f"step {state.global_step}: validation loss {text}")

    def on_train_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class BestCheckpointCallback(TrainerCallback):
    """Track the best validation score (`eval_loss`, which `PHDSTrainer` sets to the selection score) and call
    `save(model, step, losses)` whenever it improves, on every rank (so a sharded model can be gathered
    collectively; the save function writes on rank zero), then wait for every rank.

    On resume the best score so far is read back from the Trainer state's log history, so a resumed run only
    replaces the saved checkpoint with a better one.

    Example: `BestCheckpointCallback(ks=[2, 3, 4], save=lambda model, step, losses: ...)`.
    """

    def __init__(self, ks: list[int], save: Callable[[torch.nn.Module, int, dict[int, float]], None]) -> None:
        self.ks = list(ks)
        self.save = save
        self.best_score = math.inf
        self.best_step: int | None = None
        self.best_losses: dict[int, float] = {}

    def _losses(self, metrics: dict) -> dict[int, float]:
        return {k: float(metrics[eval_loss_key(k)]) for k in self.ks if eval_loss_key(k) in metrics}

    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        for entry in state.log_history:
            if "eval_loss" in entry and entry["eval_loss"] < self.best_score:
                self.best_score = float(entry["eval_loss"])
                self.best_step = int(entry.get("step", 0))
                self.best_losses = self._losses(entry)

    def on_evaluate(self, args, state: TrainerState, control: TrainerControl, metrics=None, model=None, **kwargs):
        if not metrics or "eval_loss" not in metrics:
            return
        score = float(metrics["eval_loss"])
        if not score < self.best_score:
            return
        self.best_score, self.best_step, self.best_losses = score, state.global_step, self._losses(metrics)
        self.save(model, state.global_step, self.best_losses)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
