"""oneDNN serving matmuls of frozen weights (megatron_bdlora.frozen_linear) against float64 math."""

from __future__ import annotations

import torch

from megatron_bdlora import frozen_linear
from megatron_bdlora.frozen_linear import frozen_matmul, pack_frozen_linears


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.double() @ w.double().t()).float()


def test_packed_matmul_follows_the_weight_through_in_place_updates():
    """A merged adapter changes the weight in place: the packed copy is redone, never served stale."""
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Module()
    setattr(layer, frozen_linear._ATTR, (None, None))  # what pack_frozen_linears marks
    w = torch.randn(96, 40, generator=g)
    x = torch.randn(3, 5, 40, generator=g)  # [s, b, in]
    with torch.inference_mode():
        y = frozen_matmul(layer, x, w)
        assert getattr(layer, frozen_linear._ATTR)[1] is not None  # served through a packed weight
        torch.testing.assert_close(y, _reference(x, w), rtol=1e-5, atol=1e-5)
        w.add_(torch.randn(96, 40, generator=g))
        torch.testing.assert_close(frozen_matmul(layer, x, w), _reference(x, w), rtol=1e-5, atol=1e-5)
        strided = torch.randn(40, 7, generator=g).t()  # a non-contiguous input, and no tokens at all
        torch.testing.assert_close(frozen_matmul(layer, strided, w), _reference(strided, w), rtol=1e-5, atol=1e-5)
        assert frozen_matmul(layer, x[:0], w).shape == (0, 5, 96)


def test_megatron_layers_serve_through_onednn_and_train_through_megatron(tp1, monkeypatch):
    from megatron.core import ModelParallelConfig

    from megatron_bdlora.layers import make_parallel_linear

    def parallel_config():
        return ModelParallelConfig(tensor_model_parallel_size=1, use_cpu_initialization=True,
                                   gradient_accumulation_fusion=False, sequence_parallel=False)

    monkeypatch.setenv("MEGATRON_BDLORA_ONEDNN", "1")
    g = torch.Generator().manual_seed(1)
    column = make_parallel_linear("column", 32, 48, parallel_config())
    row = make_parallel_linear("row", 48, 32, parallel_config())
    model = torch.nn.Sequential(column, row)
    assert pack_frozen_linears(model) == 2
    x = torch.randn(4, 2, 32, generator=g)
    with torch.no_grad():
        hidden, _ = column(x)
        out, _ = row(hidden)
    assert getattr(column, frozen_linear._ATTR)[1] is not None and getattr(row, frozen_linear._ATTR)[1] is not None
    torch.testing.assert_close(hidden, _reference(x, column.weight), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, _reference(_reference(x, column.weight), row.weight), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)  # autograd: megatron's own Function, gradients as before
    hidden, _ = column(x)
    hidden.sum().backward()
    torch.testing.assert_close(x.grad, column.weight.detach().sum(0).expand_as(x), rtol=1e-5, atol=1e-5)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("MEGATRON_BDLORA_ONEDNN", "0")
    assert pack_frozen_linears(torch.nn.Linear(4, 4)) == 0
    assert not frozen_linear.onednn_enabled()
