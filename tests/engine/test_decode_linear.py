import pytest
import torch
import torch.nn.functional as F
from torch import nn

from phds import tiny
from phds.engine import decode_linear


@pytest.fixture
def bmm_calls(monkeypatch):
    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(
        decode_linear.torch, "bmm", lambda *args: calls.append((args[0].shape, args[1].stride())) or bmm(*args)
    )
    return calls


@pytest.mark.parametrize("shape", [(1, 48), (1, 1, 48), (3, 48), (8, 1, 48), (2, 32, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_are_a_blocked_batched_matmul_equal_to_linear(shape, bias, bmm_calls):
    torch.manual_seed(0)
    x, weight = torch.randn(shape), torch.randn(96, 48)
    bias_O = torch.randn(96) if bias else None
    out = decode_linear.linear(x, weight, bias_O)
    assert out.shape == (*shape[:-1], 96)
    torch.testing.assert_close(out, F.linear(x, weight, bias_O))
    # the input transposed (strides 1, 48): a one-row column with strides (1, 1) makes bmm 5x slower
    assert bmm_calls == [((4, 24, 48), (0, 1, 48))]


def test_the_block_count_follows_the_output_size(bmm_calls):
    x = torch.randn(1, 8)
    torch.testing.assert_close(decode_linear.linear(x, torch.ones(6, 8)), F.linear(x, torch.ones(6, 8)))
    assert [shape for shape, _ in bmm_calls] == [(2, 3, 8)]


@pytest.mark.parametrize(
    "x, weight",
    [
        (torch.randn(65, 48), torch.randn(96, 48)),  # prefill-sized: torch's gemm
        (torch.randn(0, 48), torch.randn(96, 48)),  # no rows
        (torch.randn(1, 48), torch.randn(7, 48)),  # no block count divides 7 rows
        (torch.randn(1, 48), torch.randn(48, 96).t()),  # a transposed view: the blocks would need a copy
    ],
)
def test_other_inputs_take_torch_linear_unchanged(x, weight, bmm_calls):
    assert torch.equal(decode_linear.linear(x, weight), F.linear(x, weight))
    assert bmm_calls == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_take_torch_linear_outside_compile(dtype, bmm_calls):
    # measured 4-5x slower as blocks than torch's own kernel in bf16 (module docstring)
    x, weight = torch.randn(1, 48, dtype=dtype), torch.randn(96, 48, dtype=dtype)
    assert torch.equal(decode_linear.linear(x, weight), F.linear(x, weight))
    assert bmm_calls == []


def test_autograd_takes_torch_linear_so_gradients_flow(bmm_calls):
    weight = torch.randn(96, 48, requires_grad=True)
    decode_linear.linear(torch.randn(1, 48), weight).sum().backward()
    assert weight.grad is not None and bmm_calls == []


def test_decode_linears_swaps_plain_linears_and_restores_them_also_on_error():
    model = tiny.tiny_model("olmoe")
    linears = [module for module in model.modules() if type(module) is nn.Linear]
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ids = torch.tensor([[3, 5, 7, 11]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with decode_linear.decode_linears(model):
            assert linears and all(type(module) is decode_linear.DecodeLinear for module in linears)
            torch.testing.assert_close(model(input_ids=ids[:, :1]).logits, expected[:, :1])
        with pytest.raises(RuntimeError), decode_linear.decode_linears(model):
            raise RuntimeError("boom")
    assert all(type(module) is nn.Linear for module in linears)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
