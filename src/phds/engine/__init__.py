"""Fast inference for dialled MoE models: the "phds" sparse experts path and a mixed-k continuous-batching engine.

Importing this package registers the "phds" experts implementation in transformers' experts interface, so
`model.set_experts_implementation("phds")` and `phds.load(..., experts_implementation="phds")` work.
"""

from phds.engine.engine import Engine, Request, TokenEvent
from phds.engine.experts import IMPLEMENTATION, apply_to_other_experts, phds_experts_forward, register
from phds.engine.sampling import SamplingParams

register()

__all__ = [
    "Engine",
    "IMPLEMENTATION",
    "Request",
    "SamplingParams",
    "TokenEvent",
    "apply_to_other_experts",
    "phds_experts_forward",
    "register",
]
