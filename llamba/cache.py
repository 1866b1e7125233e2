"""The recurrent inference state: per layer, a conv window and an SSM state. Its size does not depend on
how many tokens have been read, which is why decoding memory is flat in the context length.

It is also the `cache` of transformers' `generate`: the model returns it as `cache`, generate feeds it back
with only the new token, and beam search reorders it with `reorder_cache`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamba.config import LlambaConfig


@dataclass
class LlambaState:
    conv: list[torch.Tensor]  # per layer (b, conv_dim, k-1): the last k-1 conv inputs
    ssm: list[torch.Tensor]  # per layer (b, h, p, n), fp32
    seqlen: int = 0  # tokens consumed so far
    last_logits: torch.Tensor | None = None  # (b, v) fp32: the prediction after the last token read, if kept

    @classmethod
    def alloc(
        cls,
        config: LlambaConfig,
        batch_size: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> LlambaState:
        conv = [
            torch.zeros(batch_size, config.conv_dim, config.d_conv - 1, device=device, dtype=dtype)
            for _ in range(config.n_layer)
        ]
        ssm = [
            torch.zeros(
                batch_size,
                config.n_v_heads,
                config.headdim,
                config.d_state,
                device=device,
                dtype=torch.float32,
            )
            for _ in range(config.n_layer)
        ]
        return cls(conv, ssm)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv[i], self.ssm[i]

    def update(self, i: int, new: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.conv[i], self.ssm[i] = new

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.conv + self.ssm)

    def clone(self) -> LlambaState:
        logits = self.last_logits.clone() if self.last_logits is not None else None
        return LlambaState([t.clone() for t in self.conv], [t.clone() for t in self.ssm], self.seqlen, logits)

    # transformers' generate ---------------------------------------------------------------------------
    @property
    def is_linear(self) -> list[bool]:
        """Every layer is recurrent: generate must not slice the prompt by a cached length."""
        return [True] * len(self.ssm)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seqlen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i of the state becomes row beam_idx[i] (beam_idx: (b,))."""
        self.conv = [t.index_select(0, beam_idx.to(t.device)) for t in self.conv]
        self.ssm = [t.index_select(0, beam_idx.to(t.device)) for t in self.ssm]
        if self.last_logits is not None:
            self.last_logits = self.last_logits.index_select(0, beam_idx.to(self.last_logits.device))
