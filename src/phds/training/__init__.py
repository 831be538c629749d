"""PHDS training: one fine-tune that makes an MoE checkpoint dialable to every declared k, and fixed-k oracles.

Example: `phds.training.train("tiny:olmoe", PHDSConfig(output_dir="out", ks=[2, 3, 4]), train_data="train.jsonl")`.
"""

from phds.training.callbacks import BestCheckpointCallback, JsonlLogCallback, PHDSCallback, RichProgressCallback
from phds.training.config import PHDSConfig
from phds.training.train import TrainResult, read_log, train
from phds.training.trainer import PHDSTrainer

__all__ = [
    "BestCheckpointCallback",
    "JsonlLogCallback",
    "PHDSCallback",
    "PHDSConfig",
    "PHDSTrainer",
    "RichProgressCallback",
    "TrainResult",
    "read_log",
    "train",
]
