"""One ModeGPT MLP on vLLM: this layer's own width, gated (`act(gate) * up`) or plain (`act(up)`)."""
from __future__ import annotations

from torch import Tensor, nn
from vllm.model_executor.layers.activation import get_act_and_mul_fn, get_act_fn
from vllm.model_executor.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig


class _ActAndMul(nn.Module):
    """`act(x[:, :n]) * x[:, n:]` for activations vLLM has no fused act-and-mul op for (e.g. relu)."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up


def _act_and_mul(name: str) -> nn.Module:
    try:
        return get_act_and_mul_fn(name)
    except ValueError:
        return _ActAndMul(get_act_fn(name))


class ModeGPTMLP(nn.Module):
    def __init__(self, config, width: int, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        d, bias = config.hidden_size, config.mlp_bias
        self.gated = config.mlp_type == "gated"
        if self.gated:
            self.gate_up_proj = MergedColumnParallelLinear(d, [width, width], bias=bias, quant_config=quant_config,
                                                           prefix=f"{prefix}.gate_up_proj")
            self.act = _act_and_mul(config.hidden_act)
        else:
            self.up_proj = ColumnParallelLinear(d, width, bias=bias, quant_config=quant_config,
                                                prefix=f"{prefix}.up_proj")
            self.act = get_act_fn(config.hidden_act)
        self.down_proj = RowParallelLinear(width, d, bias=bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")

    def forward(self, x: Tensor) -> Tensor:
        h, _ = (self.gate_up_proj if self.gated else self.up_proj)(x)
        out, _ = self.down_proj(self.act(h))
        return out
