"""moe-phds: Post Hoc Declared Sparsity -- one MoE checkpoint whose top-k is dialled at inference time.

The dial, loading and the schedule import at once; training, evaluation, the engine and the server are loaded on
first use (`phds.train`, `phds.evaluate`, ...), so `import phds` stays light.
"""

import importlib

from phds.dial import MoELayer, NotAnMoEError, active_experts, get_k, moe_layers, set_k, sparsity
from phds.loading import load, register_experts_module, save
from phds.policies import Skip, TopP
from phds.schedule import PHDSSchedule
from phds.sidecar import Sidecar, read_sidecar, write_sidecar
from phds.tiny import tiny_config, tiny_model, tiny_tokenizer

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "PHDSConfig": "phds.training",
    "TrainResult": "phds.training",
    "train": "phds.training",
    "evaluate": "phds.evaluation",
    "sweep": "phds.evaluation",
    "compare": "phds.evaluation",
    "Engine": "phds.engine",
    "SamplingParams": "phds.engine",
    "ServeConfig": "phds.serving",
    "serve": "phds.serving",
    "export": "phds.serving",
    "DemoConfig": "phds.demo",
    "run_demo": "phds.demo",
    "make_demo_data": "phds.demo_data",
    "calibrate": "phds.calibration",
    "allocate": "phds.allocation",
}


# `load(experts_implementation="phds")` imports the engine, whose import registers it with transformers.
register_experts_module("phds", "phds.engine")


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'phds' has no attribute {name!r}")


__all__ = [
    "MoELayer",
    "NotAnMoEError",
    "PHDSSchedule",
    "Sidecar",
    "Skip",
    "TopP",
    "active_experts",
    "get_k",
    "load",
    "moe_layers",
    "read_sidecar",
    "save",
    "set_k",
    "sparsity",
    "tiny_config",
    "tiny_model",
    "tiny_tokenizer",
    "write_sidecar",
    *_LAZY,
]
