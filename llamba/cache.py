"""The recurrent inference state: per layer, a conv window and an SSM state. Its size does not depend on
how many tokens have been read, which is why decoding memory is flat in the context length."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llamba.config import LlambaConfig


@dataclass
class LlambaState:
    conv: list[torch.Tensor]  # per layer (b, conv_dim, k-1): the last k-1 conv inputs
    ssm: list[torch.Tensor]  # per layer (b, h, p, n), fp32
    seqlen: int = 0  # tokens consumed so far
    extra: dict = field(default_factory=dict)

    @classmethod
    def alloc(cls, config: LlambaConfig, batch_size: int = 1, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> LlambaState:
        conv = [torch.zeros(batch_size, config.conv_dim, config.d_conv - 1, device=device, dtype=dtype)
                for _ in range(config.n_layer)]
        ssm = [torch.zeros(batch_size, config.n_v_heads, config.headdim, config.d_state, device=device,
                           dtype=torch.float32) for _ in range(config.n_layer)]
        return cls(conv, ssm)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv[i], self.ssm[i]

    def update(self, i: int, new: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.conv[i], self.ssm[i] = new

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.conv + self.ssm)

    def clone(self) -> LlambaState:
        return LlambaState([t.clone() for t in self.conv], [t.clone() for t in self.ssm], self.seqlen, dict(self.extra))
