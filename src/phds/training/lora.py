"""LoRA (PEFT) set-up of a PHDS run: which modules and expert parameters get adapters, the router, and the merge.

Experts of transformers MoE models are 3-D `nn.Parameter`s, so LoRA reaches them through PEFT's
`target_parameters`; attention and shared experts are `nn.Linear`s reached through `target_modules`. The router is
trained fully (it is small) or frozen, never adapted.
"""

from __future__ import annotations

import copy

from torch import nn

from phds import dial
from phds.training.config import PHDSConfig


def default_targets(model: nn.Module, layers: list[dial.MoELayer]) -> tuple[list[str], list[str]]:
    """Default LoRA targets: every nn.Linear but the LM head (attention, shared experts), and every 3-D routed
    expert parameter by its `block.experts.param` suffix.

    Example: `modules, parameters = default_targets(model, phds.moe_layers(model))`.
    """
    head = model.get_output_embeddings()
    linear = sorted(
        {
            name.rpartition(".")[2]
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not head
        }
    )
    names = {id(module): name for name, module in model.named_modules()}
    parameters = set()
    for layer in layers:
        block_leaf = layer.name.rpartition(".")[2]
        experts_leaf = names[id(layer.experts)].rpartition(".")[2]
        for param_name, param in layer.experts.named_parameters(recurse=False):
            if param.dim() == 3:
                parameters.add(f"{block_leaf}.{experts_leaf}.{param_name}")
    return linear, sorted(parameters)


def set_router_trainable(model: nn.Module, trainable: bool) -> None:
    """Train (or freeze) every router of `model` in full.

    Example: `set_router_trainable(model, False)`.
    """
    for layer in dial.moe_layers(model):
        for param in layer.router.parameters():
            param.requires_grad_(trainable)


def prepare(model: nn.Module, config: PHDSConfig, layers: list[dial.MoELayer]) -> nn.Module:
    """The model to train: wrapped in LoRA adapters when `config.lora`, with the routers trained or frozen as
    `config.train_router` says.

    Example: `model = prepare(model, config, phds.moe_layers(model))`.
    """
    if not config.lora:
        if not config.train_router:
            set_router_trainable(model, False)
        return model
    from peft import LoraConfig, get_peft_model

    linear, parameters = default_targets(model, layers)
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules if config.lora_target_modules is not None else linear,
        target_parameters=config.lora_target_parameters if config.lora_target_parameters is not None else parameters,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora_config)
    # The router is not an nn.Linear; trained fully (it is small) rather than through an adapter.
    set_router_trainable(peft_model, config.train_router)
    return peft_model


def merged(model: nn.Module) -> nn.Module:
    """A plain transformers model with the adapters folded in (a copy for a PEFT model; the model itself else).

    Example: `merged(peft_model).save_pretrained("out")`.
    """
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model
