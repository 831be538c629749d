"""The load-balancing loss is computed at the dialled k: as a model built at that k computes it."""

from __future__ import annotations

import pytest
import torch

import phds

ARCHS = ["olmoe", "qwen2_moe", "mixtral"]


@pytest.mark.parametrize("arch", ARCHS)
def test_aux_loss_at_a_dialled_k_equals_the_aux_loss_of_a_model_built_at_that_k(arch, input_ids):
    model = phds.tiny_model(arch, output_router_logits=True)
    losses = {}
    for k in (2, 4):
        phds.set_k(model, k)
        dialled = model(input_ids=input_ids, labels=input_ids).aux_loss
        twin = phds.tiny_model(arch, num_experts_per_tok=k, output_router_logits=True)
        twin.load_state_dict(model.state_dict())
        built = twin(input_ids=input_ids, labels=input_ids).aux_loss
        torch.testing.assert_close(dialled, built)
        losses[k] = dialled.item()
    assert losses[2] != pytest.approx(losses[4])


def test_the_training_loss_adds_the_aux_loss_at_the_dialled_k_with_its_coefficient(input_ids):
    model = phds.tiny_model("olmoe", output_router_logits=True, router_aux_loss_coef=0.5)
    phds.set_k(model, 2)
    with_aux = model(input_ids=input_ids, labels=input_ids)
    lm_only = model(input_ids=input_ids, labels=input_ids, output_router_logits=False)
    torch.testing.assert_close(with_aux.loss, lm_only.loss + 0.5 * with_aux.aux_loss)
