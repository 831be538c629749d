"""moe-phds: Post Hoc Declared Sparsity -- one MoE checkpoint whose top-k is dialled at inference time."""

from phds.dial import MoELayer, NotAnMoEError, get_k, moe_layers, set_k, sparsity
from phds.loading import load, save
from phds.sidecar import Sidecar, read_sidecar, write_sidecar
from phds.tiny import tiny_config, tiny_model, tiny_tokenizer

__version__ = "0.1.0"

__all__ = [
    "MoELayer",
    "NotAnMoEError",
    "Sidecar",
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
]
