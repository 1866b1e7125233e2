"""The discrete Mamba-2 mixer of Llamba (docs/equations.md §M1-M2): a multi-head SSM whose per-token decay comes straight
from the input, a_t = exp(-softplus(A_log_t)), with no Δ discretization.

in_proj rows are ordered x | B | C | z | A_log (cartesia's layout, so released checkpoints load as they are);
a depthwise causal conv runs over x, B, C; y = scan + D x; out = out_proj(y * silu(z + z_bias)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamba.config import LlambaConfig
from llamba.ops import causal_conv1d, causal_conv1d_step, materialize_mixer, ssd_chunked, ssd_step

# silu(Z_IDENTITY) == 1 to 1e-13: with zero z rows the gate is the identity at init (docs/equations.md §M4).
Z_IDENTITY = 1.278464542761


class DiscreteMamba2(nn.Module):
    def __init__(self, config: LlambaConfig, layer_idx: int | None = None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.d_inner, self.h, self.g = config.d_inner, config.n_v_heads, config.n_qk_heads
        self.p, self.n = config.headdim, config.d_state
        self.in_proj = nn.Linear(config.d_model, config.d_in_proj, bias=config.bias)
        self.z_bias = nn.Parameter(torch.zeros(self.d_inner)) if not config.bias else None
        self.conv1d = nn.Conv1d(
            config.conv_dim,
            config.conv_dim,
            config.d_conv,
            groups=config.conv_dim,
            padding=config.d_conv - 1,
            bias=config.conv_bias,
        )
        self.D = nn.Parameter(torch.ones(self.h))
        self.out_proj = nn.Linear(self.d_inner, config.d_model, bias=config.bias)
        self.kernels = "auto"  # set by LlambaForCausalLM.set_kernels

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Llamba recipe (docs/equations.md §M4): default Linear init, identity conv, identity gate, D = 1,
        out_proj scaled by 1/sqrt(n_layer) (GPT-2 style residual rescale)."""
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()
        self.out_proj.weight /= self.config.n_layer**0.5
        for lin in (self.in_proj, self.out_proj):
            if lin.bias is not None:
                lin.bias.zero_()
        self.in_proj.weight[self.z_rows()] = 0
        if self.z_bias is not None:
            self.z_bias.fill_(Z_IDENTITY)
        elif self.in_proj.bias is not None:
            self.in_proj.bias[self.z_rows()] = Z_IDENTITY
        self.conv1d.weight.zero_()
        self.conv1d.weight[:, 0, -1] = 1.0  # only the current-token tap
        if self.conv1d.bias is not None:
            self.conv1d.bias.zero_()
        self.D.fill_(1.0)

    # Row blocks of in_proj --------------------------------------------------------------------------
    def x_rows(self) -> slice:
        return slice(0, self.d_inner)

    def b_rows(self) -> slice:
        return slice(self.d_inner, self.d_inner + self.g * self.n)

    def c_rows(self) -> slice:
        return slice(self.d_inner + self.g * self.n, self.d_inner + 2 * self.g * self.n)

    def z_rows(self) -> slice:
        start = self.config.conv_dim
        return slice(start, start + self.d_inner)

    def a_rows(self) -> slice:
        return slice(self.config.conv_dim + self.d_inner, self.config.d_in_proj)

    # Forward ------------------------------------------------------------------------------------------
    def _gate_bias(self) -> torch.Tensor | float:
        return self.z_bias if self.z_bias is not None else 0.0

    def _split_xbc(self, xbc: torch.Tensor):
        # xbc: (..., conv_dim) -> x (..., h, p), B (..., g, n), C (..., g, n)
        x, B, C = torch.split(xbc, [self.d_inner, self.g * self.n, self.g * self.n], dim=-1)
        lead = xbc.shape[:-1]
        return (
            x.reshape(*lead, self.h, self.p),
            B.reshape(*lead, self.g, self.n),
            C.reshape(*lead, self.g, self.n),
        )

    def forward(
        self,
        u: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_matrix: bool = False,
        mask: torch.Tensor | None = None,
    ):
        """u: (b, l, d); state: (conv (b, conv_dim, k-1), ssm (b, h, p, n)) to continue from, or None;
        mask: (b, l), 0 at padding. Padded positions leave the state as it was: their conv input is zero
        (a left-padded window looks like a fresh one) and their decay is 1 with x = 0 (the SSM state is held).

        Returns (out (b, l, d), new_state, M) with M the (b, h, l, l) mixing matrix when return_matrix,
        else None. M includes D on its diagonal, so M @ x is the pre-gate output y."""
        b, l, _ = u.shape
        proj = self.in_proj(u)
        xbc, z, a_log = torch.split(proj, [self.config.conv_dim, self.d_inner, self.h], dim=-1)
        conv_state, ssm_state = state if state is not None else (None, None)
        keep = mask.to(xbc.dtype)[..., None] if mask is not None else None  # (b, l, 1)
        if keep is not None:
            xbc = xbc * keep
        xbc, conv_state = causal_conv1d(
            xbc.transpose(1, 2), self.conv1d.weight[:, 0], self.conv1d.bias, conv_state, kernels=self.kernels
        )
        xbc = xbc.transpose(1, 2)  # (b, l, conv_dim)
        if self.config.activation == "silu":
            xbc = F.silu(xbc)
        if keep is not None:
            xbc = xbc * keep
        x, B, C = self._split_xbc(xbc)
        log_decay = -F.softplus(a_log.float())  # (b, l, h): log a_t
        if keep is not None:
            log_decay = log_decay * keep.float()
        y, ssm_state = ssd_chunked(
            x, log_decay, B, C, self.config.chunk_size, initial_state=ssm_state, kernels=self.kernels
        )
        y = y + self.D[:, None].to(y.dtype) * x
        y = y.reshape(b, l, self.d_inner) * F.silu(z + self._gate_bias())
        out = self.out_proj(y)
        matrix = materialize_mixer(log_decay, B, C, self.D) if return_matrix else None
        return out, (conv_state, ssm_state), matrix

    def step(self, u: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """One token. u: (b, d), state: (conv (b, conv_dim, k-1), ssm (b, h, p, n)) -> (out (b, d), new_state)."""
        proj = self.in_proj(u)
        xbc, z, a_log = torch.split(proj, [self.config.conv_dim, self.d_inner, self.h], dim=-1)
        conv_state, ssm_state = state
        xbc, conv_state = causal_conv1d_step(
            xbc, conv_state, self.conv1d.weight[:, 0], self.conv1d.bias, kernels=self.kernels
        )
        if self.config.activation == "silu":
            xbc = F.silu(xbc)
        x, B, C = self._split_xbc(xbc)
        log_decay = -F.softplus(a_log.float())  # (b, h)
        y, ssm_state = ssd_step(x, log_decay, B, C, ssm_state, kernels=self.kernels)
        y = torch.addcmul(y, self.D[:, None].to(y.dtype), x).view(u.shape[0], self.d_inner)
        y = y * F.silu(z + self._gate_bias())
        return self.out_proj(y), (conv_state, ssm_state)
