"""Llamba: the Llama skeleton with every attention block replaced by a discrete Mamba-2 mixer.

    embedding -> n_layer x [h + mixer(input_layernorm(h)); h + mlp(post_attention_layernorm(h))]
              -> final_layernorm -> lm_head (tied to the embedding or not)

Sub-layer names follow Llama (and cartesia's checkpoints) so teacher weights copy over by name.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from llamba.cache import LlambaState
from llamba.config import LlambaConfig, register_auto_config
from llamba.mixer import DiscreteMamba2
from llamba.ops import resolve_kernels


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d), normalized in fp32 as Llama does
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel, same values
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


class LlambaBlock(GradientCheckpointingLayer):
    """With gradient checkpointing on (training), transformers re-runs `forward` in the backward pass; that is
    safe because the block returns its new state instead of writing it."""

    def __init__(self, config: LlambaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = DiscreteMamba2(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = LlambaMLP(config)

    def forward(
        self,
        h: torch.Tensor,
        state=None,
        run_mlp: bool = True,
        return_matrix: bool = False,
        mask: torch.Tensor | None = None,
    ):
        """h: (b, l, d) -> (h', new mixer state, mixing matrix or None). With run_mlp=False, h' is the
        mixer output alone (no residual): what stage 1 and mixer-only stage 2 compare. mask: (b, l), 0 = padding."""
        mixed, new_state, matrix = self.mixer(
            self.input_layernorm(h), state, return_matrix=return_matrix, mask=mask
        )
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
    cache: LlambaState | None = None  # the same state, under the name transformers' generate reads back
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


class LlambaForCausalLM(LlambaPreTrainedModel, GenerationMixin):
    """transformers' `generate` works with the recurrent state as its cache: only the new token is fed after
    the prompt, so each step costs the same at any context length; beam search reorders the state rows."""

    _is_stateful = True  # no assisted decoding: a recurrent state cannot be rolled back to a prefix
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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        state: LlambaState | None = None,
        output_hidden_states: bool = False,
        num_last_tokens: int = 0,
        attention_mask: torch.Tensor | None = None,
        cache: LlambaState | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_residuals: bool = False,
        **_ignored,
    ) -> LlambaOutput:
        """input_ids: (b, l) (or inputs_embeds: (b, l, d)). With `state` (alias `cache`), continues from it
        (prefill / multi-turn) and updates it in place; use_cache=True without one starts a new state.
        attention_mask: (b, t >= l) 1 = token, 0 = padding; its last l columns mask this call's tokens, and
        padded positions leave the state unchanged (left padding gives the unpadded result).
        labels: (b, l), shifted inside, -100 ignored. num_last_tokens (alias logits_to_keep) > 0 computes only
        the last logits. return_residuals: also return every residual stream before the final norm
        (`residuals`)."""
        state = state if state is not None else cache
        if (
            state is not None
            and inputs_embeds is None
            and input_ids.shape[1] == 1
            and labels is None
            and not output_hidden_states
            and not torch.is_grad_enabled()
            and (attention_mask is None or bool(attention_mask[:, -1].all()))
        ):
            # One new token on a state (generate's decode steps): the O(1) recurrent step, as llamba.generate.
            logits = self.step(input_ids[:, 0], state)[:, None]
            return LlambaOutput(logits=logits, state=state, cache=state)
        h = self.backbone.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        if state is None and use_cache:
            state = self.alloc_state(h.shape[0])
        mask = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            mask = attention_mask[:, -h.shape[1] :]
        hidden = [h] if output_hidden_states else None
        resid = [h] if return_residuals else None
        h = self._blocks(h, state, mask, hidden, resid)
        if output_hidden_states:
            hidden[-1] = h  # HF convention: the last entry is after the final norm
        if state is not None:
            state.seqlen += h.shape[1]
        keep = num_last_tokens or logits_to_keep
        if keep > 0:
            h = h[:, -keep:]
        logits = self.lm_head(h).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return LlambaOutput(
            loss=loss,
            logits=logits,
            hidden_states=tuple(hidden) if hidden else None,
            state=state,
            cache=state,
            residuals=tuple(resid) if resid else None,
        )

    def _blocks(
        self,
        h: torch.Tensor,
        state: LlambaState | None = None,
        mask: torch.Tensor | None = None,
        hidden: list | None = None,
        resid: list | None = None,
    ) -> torch.Tensor:
        """h: (b, l, d) embeddings -> (b, l, d) after every block and the final norm; updates `state` per layer and
        appends each block's output to `hidden` / `resid` when given."""
        for i, block in enumerate(self.backbone.layers):
            h, new_state, _ = block(h, state.layer(i) if state is not None else None, mask=mask)
            if state is not None:
                state.update(i, new_state)
            for out in (hidden, resid):
                if out is not None:
                    out.append(h)
        return self.backbone.final_layernorm(h)

    def final_hidden(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """input_ids: (b, l) -> (b, l, d): the last hidden state after the final norm, no state, no logits (what
        stage 3 feeds to its fused head + KD loss, so the (b, l, vocab) logits never materialize)."""
        return self._blocks(self.backbone.embedding(input_ids))

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: LlambaState | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> dict:
        """After the prompt only the last token is fed (the state holds the rest); the mask then has no
        padding left to apply, so it is dropped."""
        if cache is not None and cache.seqlen > 0:
            input_ids, attention_mask = input_ids[:, -1:], None
            kwargs.pop("inputs_embeds", None)
        kwargs.pop("next_sequence_length", None)
        kwargs.pop("is_first_iteration", None)
        kwargs.pop("position_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        inputs = {"input_ids": input_ids} if embeds is None else {"inputs_embeds": embeds}
        return {**inputs, "cache": cache, "attention_mask": attention_mask, **kwargs}

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # cartesia's pytorch_model.bin files may prefix every name with "model."; ours never do.
        kwargs.setdefault("key_mapping", {r"^model\.": ""})
        return super().from_pretrained(*args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' save_pretrained, plus what makes the directory usable anywhere: `auto_map` with the
        flattened remote-code files (llamba.remote_code) and a model card (README.md) from the config."""
        from llamba.card import model_card
        from llamba.remote_code import AUTO_MAP, write_remote_code

        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory)
        (Path(save_directory) / "README.md").write_text(model_card(self.config), encoding="utf-8")

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not build a DynamicCache: forward allocates a LlambaState instead

    @torch.no_grad()
    def step(self, input_ids: torch.LongTensor, state: LlambaState) -> torch.Tensor:
        """One token per sequence: input_ids (b,) -> logits (b, v) fp32; `state` is updated in place."""
        compiled = self.__dict__.get("_compiled_step")
        if compiled is not None:
            logits = self._run_compiled_step(compiled, input_ids, state)
            if logits is not None:
                state.seqlen += 1
                return logits
        h = self.backbone.embedding(input_ids)
        for i, block in enumerate(self.backbone.layers):
            h, new_state = block.step(h, state.layer(i))
            state.update(i, new_state)
        state.seqlen += 1
        return self.lm_head(self.backbone.final_layernorm(h)).float()

    def use_compiled_step(self, enabled: bool = True) -> LlambaForCausalLM:
        """Decode through torch.compile (inductor) of one whole `step`: every layer and the head as one graph
        that writes the state back in place, so the graph is reused at every context length.

        Opt-in (`llamba chat/generate --compile`): the first step compiles (about a minute on 2 CPU cores; again
        for another batch size); it gave 1.21x eager tok/s there (BENCHMARKS.md, issue 15). If compiling fails,
        one warning and the eager step from then on."""
        self.__dict__["_compiled_step"] = {"fn": None} if enabled else None
        return self

    def _step_graph(self, input_ids, conv: list[torch.Tensor], ssm: list[torch.Tensor]) -> torch.Tensor:
        # input_ids: (b,); conv[i]: (b, conv_dim, k-1), ssm[i]: (b, h, p, n) fp32, both overwritten in place
        h = self.backbone.embedding(input_ids)
        for i, block in enumerate(self.backbone.layers):
            h, (c, s) = block.step(h, (conv[i], ssm[i]))
            conv[i].copy_(c)
            if s is not ssm[i]:
                ssm[i].copy_(s)
        return self.lm_head(self.backbone.final_layernorm(h)).float()

    def _run_compiled_step(self, compiled: dict, input_ids, state: LlambaState) -> torch.Tensor | None:
        # The graph writes into the state: each tensor must be a plain one of its own (a prefill leaves views
        # into its conv window, inference mode leaves inference tensors).
        for tensors in (state.conv, state.ssm):
            for i, t in enumerate(tensors):
                if (
                    not t.is_contiguous()
                    or t.requires_grad
                    or (t.is_inference() and not torch.is_inference_mode_enabled())
                ):
                    tensors[i] = t.detach().clone(memory_format=torch.contiguous_format)
        try:
            if compiled["fn"] is None:
                compiled["fn"] = torch.compile(self._step_graph, dynamic=False)
            return compiled["fn"](input_ids, state.conv, state.ssm)
        except Exception as e:  # no C++ compiler, unsupported op or platform: eager from now on
            self.__dict__["_compiled_step"] = None
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            warnings.warn(
                f"torch.compile of the decode step failed ({type(e).__name__}: {first}); decoding eagerly",
                stacklevel=3,
            )
            return None


def register_auto_classes() -> None:
    """AutoConfig / AutoModelForCausalLM.from_pretrained(dir) resolve model_type 'llamba' (runs on import)."""
    from transformers import AutoModelForCausalLM

    register_auto_config()
    try:
        AutoModelForCausalLM.register(LlambaConfig, LlambaForCausalLM)
    except ValueError:  # already registered (re-import)
        pass


register_auto_classes()
