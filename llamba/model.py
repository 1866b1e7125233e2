"""Llamba: the Llama skeleton with every attention block replaced by a discrete Mamba-2 mixer.

    embedding -> n_layer x [h + mixer(input_layernorm(h)); h + mlp(post_attention_layernorm(h))]
              -> final_layernorm -> lm_head (tied to the embedding or not)

Sub-layer names follow Llama (and cartesia's checkpoints) so teacher weights copy over by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from llamba.cache import LlambaState
from llamba.config import LlambaConfig
from llamba.mixer import DiscreteMamba2
from llamba.ops import resolve_kernels


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d), normalized in fp32 as Llama does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LlambaMLP(nn.Module):
    """SwiGLU, as in Llama: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlambaConfig):
        super().__init__()
        d, m, bias = config.d_model, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, m, bias=bias)
        self.up_proj = nn.Linear(d, m, bias=bias)
        self.down_proj = nn.Linear(m, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlambaBlock(nn.Module):
    def __init__(self, config: LlambaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = DiscreteMamba2(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = LlambaMLP(config)

    def forward(self, h: torch.Tensor, state=None, run_mlp: bool = True, return_matrix: bool = False):
        """h: (b, l, d) -> (h', new mixer state, mixing matrix or None). With run_mlp=False, h' is the
        mixer output alone (no residual): what stage 1 and mixer-only stage 2 compare."""
        mixed, new_state, matrix = self.mixer(self.input_layernorm(h), state, return_matrix=return_matrix)
        if not run_mlp:
            return mixed, new_state, matrix
        h = h + mixed
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, new_state, matrix

    def step(self, h: torch.Tensor, state):
        """h: (b, d) -> (h', new_state)."""
        mixed, new_state = self.mixer.step(self.input_layernorm(h), state)
        h = h + mixed
        return h + self.mlp(self.post_attention_layernorm(h)), new_state


class LlambaBackbone(nn.Module):
    def __init__(self, config: LlambaConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([LlambaBlock(config, i) for i in range(config.n_layer)])
        self.final_layernorm = RMSNorm(config.d_model, config.norm_eps)


@dataclass
class LlambaOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (b, l, v), or (b, num_last_tokens, v)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # n_layer + 1 residual streams, like HF Llama
    state: LlambaState | None = None
    # return_residuals: n_layer + 1 residual streams (b, l, d), all before the final norm (entry i is the input of
    # layer i), the layout of distill.teacher.teacher_residuals' "resid"
    residuals: tuple[torch.Tensor, ...] | None = None


class LlambaPreTrainedModel(PreTrainedModel):
    config_class = LlambaConfig
    config: LlambaConfig
    base_model_prefix = "backbone"
    _no_split_modules = ["LlambaBlock"]
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, DiscreteMamba2):
            module.reset_parameters()
        elif isinstance(module, LlambaMLP):
            for lin in (module.gate_proj, module.up_proj, module.down_proj):
                lin.reset_parameters()
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)


class LlambaForCausalLM(LlambaPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "backbone.embedding.weight"}

    def __init__(self, config: LlambaConfig):
        super().__init__(config)
        self.backbone = LlambaBackbone(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embedding

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_kernels(self, kernels: str) -> LlambaForCausalLM:
        """'auto' (CUDA kernels when installed and on GPU), 'torch' (reference paths) or 'cuda' (required)."""
        resolve_kernels(kernels, self.device)  # fail now, with the install hint, rather than mid-forward
        for block in self.backbone.layers:
            block.mixer.kernels = kernels
        return self

    def alloc_state(self, batch_size: int = 1) -> LlambaState:
        return LlambaState.alloc(self.config, batch_size, self.device, self.dtype)

    def forward(self, input_ids: torch.LongTensor, labels: torch.LongTensor | None = None,
                state: LlambaState | None = None, output_hidden_states: bool = False,
                num_last_tokens: int = 0, return_residuals: bool = False, **_ignored) -> LlambaOutput:
        """input_ids: (b, l). With `state`, continues from it (prefill / multi-turn) and updates it in place.
        labels: (b, l), shifted inside, -100 ignored. num_last_tokens > 0 computes only the last logits.
        return_residuals: also return every residual stream before the final norm (`residuals`)."""
        h = self.backbone.embedding(input_ids)
        hidden = [h] if output_hidden_states else None
        resid = [h] if return_residuals else None
        for i, block in enumerate(self.backbone.layers):
            h, new_state, _ = block(h, state.layer(i) if state is not None else None)
            if state is not None:
                state.update(i, new_state)
            if output_hidden_states:
                hidden.append(h)
            if return_residuals:
                resid.append(h)
        h = self.backbone.final_layernorm(h)
        if output_hidden_states:
            hidden[-1] = h  # HF convention: the last entry is after the final norm
        if state is not None:
            state.seqlen += input_ids.shape[1]
        if num_last_tokens > 0:
            h = h[:, -num_last_tokens:]
        logits = self.lm_head(h).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return LlambaOutput(loss=loss, logits=logits, hidden_states=tuple(hidden) if hidden else None, state=state,
                            residuals=tuple(resid) if resid else None)

    @torch.no_grad()
    def step(self, input_ids: torch.LongTensor, state: LlambaState) -> torch.Tensor:
        """One token per sequence: input_ids (b,) -> logits (b, v) fp32; `state` is updated in place."""
        h = self.backbone.embedding(input_ids)
        for i, block in enumerate(self.backbone.layers):
            h, new_state = block.step(h, state.layer(i))
            state.update(i, new_state)
        state.seqlen += 1
        return self.lm_head(self.backbone.final_layernorm(h)).float()
