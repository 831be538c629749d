"""Tiny random-initialised MoE models of every supported family, for tests, examples and the demo.

Each family gets a config of a few tens of thousands of parameters: 2 decoder layers, hidden 32, 8 experts, top-4
(top-1 for Llama 4 and top-2 for PhiMoE, as released; override any field through `**overrides`). No network: configs are built, weights are random from `seed`.
"""

from __future__ import annotations

import torch
import transformers

# family -> (config class name, fields). Names are the transformers spelling of each field.
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "olmoe": ("OlmoeConfig", dict(num_experts=8, intermediate_size=32, norm_topk_prob=False)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(num_experts=8, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(num_experts=8, intermediate_size=64, moe_intermediate_size=32, norm_topk_prob=True, head_dim=8),
    ),
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, intermediate_size=32, head_dim=8)),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            n_routed_experts=8,
            n_shared_experts=1,
            n_group=2,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            first_k_dense_replace=0,
            num_key_value_heads=4,
            intermediate_size=64,
            moe_intermediate_size=32,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(
            num_local_experts=8,
            intermediate_size=32,
            head_dim=8,
            sliding_window=16,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    # Llama 4 routes top-1 (sigmoid of the chosen logit) beside an always-on shared expert: k_pre 1, as released.
    "llama4": (
        "Llama4TextConfig",
        dict(num_local_experts=8, num_experts_per_tok=1, intermediate_size=32, intermediate_size_mlp=64, head_dim=8),
    ),
    # PhiMoE's sparsemixer always picks 2 experts, whatever num_experts_per_tok says: k_pre 2, as released. A wide
    # jitter threshold (released: 0.01) so that a slot's softmax spans several experts and its weight is not 1.
    "phimoe": (
        "PhimoeConfig",
        dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, router_jitter_noise=0.25),
    ),
    # JetMoE routes both its attention (query/output projections) and its MLP through top-k experts.
    "jetmoe": ("JetMoeConfig", dict(num_local_experts=8, intermediate_size=32, kv_channels=8)),
    "afmoe": (
        "AfmoeConfig",
        dict(
            num_experts=8,
            num_shared_experts=1,
            num_dense_layers=0,
            intermediate_size=64,
            moe_intermediate_size=32,
            route_scale=2.5,
            head_dim=8,
            sliding_window=16,
            global_attn_every_n_layers=2,
        ),
    ),
}

FAMILIES = tuple(TINY_CONFIGS)

_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=4,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(arch: str = "olmoe", **overrides) -> transformers.PretrainedConfig:
    """The config of a tiny `arch` MoE (see `TINY_CONFIGS`), with `overrides` applied.

    Example: `phds.tiny_config("mixtral", num_experts_per_tok=2)`.
    """
    if arch not in TINY_CONFIGS:
        raise ValueError(f"`arch` must be one of {list(TINY_CONFIGS)}, got {arch!r}")
    class_name, fields = TINY_CONFIGS[arch]
    config_class = getattr(transformers, class_name)
    return config_class(**{**_COMMON, **fields, **overrides})


def tiny_model(arch: str = "olmoe", *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny random `arch` MoE for causal LM (`AutoModelForCausalLM.from_config`), in eval mode.

    Args:
        arch: one of `phds.tiny.FAMILIES`: olmoe, qwen2_moe, qwen3_moe, mixtral, deepseek_v3, gpt_oss, llama4 (k_pre 1),
            phimoe (k_pre 2), jetmoe, afmoe.
        seed: weights are a pure function of `arch`, `seed` and `overrides`.
        dtype: parameter dtype.
        **overrides: config fields, e.g. `num_experts_per_tok=2`, `num_hidden_layers=4`.

    Example: `model = phds.tiny_model("qwen2_moe", num_experts_per_tok=2)`.
    """
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # DeepSeek-V3's and AFMoE's load-balancing biases are zero at init; give them values so the tests exercise
    # bias-corrected selection (chosen by sigmoid + bias, weighted by sigmoid alone).
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif name.endswith("router.gate.weight") and not tensor.any():
                # AFMoE initialises its router at zero (every token would route alike): draw it like the others.
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * config.initializer_range)
    return model.eval()


# A character-level tokenizer: 4 specials, newline and printable ASCII. Fits the tiny models' 128-token vocab.
SPECIAL_TOKENS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer():
    """A character-level `PreTrainedTokenizerFast` (100 ids) with a chat template, built offline.

    Example: `tok = phds.tiny_tokenizer(); tok("12+3=").input_ids`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = dict(SPECIAL_TOKENS)
    for char in ["\n"] + [chr(c) for c in range(32, 127)]:
        vocab[char] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
