"""Student initialization from a Llama teacher.

Always copied: embedding, every RMSNorm, every MLP, the LM head (tied or untied as the teacher).
Mixer init (`--init`):
    llamba     the published recipe (docs/equations.md §M4): default Linear init, identity conv, identity gate (z rows 0,
               z_bias = 1.2785 so silu = 1), D = 1; stage 1 then shapes the mixers. The A_log rows start near 0, so
               every head forgets half its state per token (a_t ~ 0.5), and short budgets barely move them: after the
               150,000-token default run no head of SmolLM2's student keeps half its state past 4.4 tokens
    llamba-slow  the recipe plus a bias on the A_log rows (the student gets in_proj / out_proj biases, zero but for
               these): per head a_t starts at exp(-dt) with dt log-uniform in SLOW_DT, a state half-life of
               7-700 tokens, as Mamba-2 initializes its step sizes
    attention  queries -> C (with the 1/sqrt(head_dim) softmax scale folded in), keys -> B, values -> x,
               o_proj -> out_proj; K and V are expanded from kv heads to query heads by whole head blocks
               (the teacher's repeat_kv); D = 0 (attention has no skip); conv and gate identity; A_log default.
               Needs d_state = head_dim and n_v_heads * head_dim = d_inner.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llamba.config import LlambaConfig
from llamba.errors import LlambaError
from llamba.model import LlambaForCausalLM

INIT_CHOICES = ("llamba", "llamba-slow", "attention")
SLOW_DT = (1e-3, 1e-1)  # llamba-slow: the range of -log a_t at init (Mamba-2's dt_min, dt_max)


class InitError(LlambaError, ValueError):
    """A student that cannot be built from this teacher; the message names the field."""


def expand_kv_heads(w: torch.Tensor, n_kv: int, n_heads: int) -> torch.Tensor:
    """w: (n_kv * hd, d) rows of k_proj / v_proj -> (n_heads * hd, d): kv head j serves query heads
    j * r .. (j + 1) * r - 1 with r = n_heads / n_kv, so whole (hd, d) blocks are repeated, never single rows."""
    hd = w.shape[0] // n_kv
    return w.view(n_kv, hd, -1).repeat_interleave(n_heads // n_kv, dim=0).reshape(n_heads * hd, -1)


def student_config(teacher, **overrides) -> LlambaConfig:
    try:
        return LlambaConfig.from_llama_config(teacher.config, **overrides)
    except ValueError as e:
        raise InitError(str(e)) from None


@torch.no_grad()
def copy_non_mixer(student: LlambaForCausalLM, teacher: nn.Module) -> None:
    """Embedding, norms, MLPs and LM head, by the shared Llama sub-layer names."""
    tm, sb = teacher.model, student.backbone
    sb.embedding.weight.copy_(tm.embed_tokens.weight)
    sb.final_layernorm.weight.copy_(tm.norm.weight)
    for t_layer, s_layer in zip(tm.layers, sb.layers, strict=True):
        s_layer.input_layernorm.weight.copy_(t_layer.input_layernorm.weight)
        s_layer.post_attention_layernorm.weight.copy_(t_layer.post_attention_layernorm.weight)
        s_layer.mlp.load_state_dict(t_layer.mlp.state_dict())
    if not student.config.tie_embeddings:
        student.lm_head.weight.copy_(teacher.lm_head.weight)


@torch.no_grad()
def init_mixer_from_attention(mixer, attn, n_heads: int, n_kv: int, head_dim: int) -> None:
    """One layer: teacher self_attn (q/k/v/o_proj) -> DiscreteMamba2 (in_proj x|B|C rows, out_proj, D, gate, conv)."""
    mixer.reset_parameters()  # identity conv and gate, default A_log rows
    w = mixer.in_proj.weight
    w[mixer.x_rows()] = expand_kv_heads(attn.v_proj.weight, n_kv, n_heads)
    w[mixer.b_rows()] = expand_kv_heads(attn.k_proj.weight, n_kv, n_heads)
    w[mixer.c_rows()] = attn.q_proj.weight * head_dim**-0.5
    mixer.out_proj.weight.copy_(attn.o_proj.weight)
    mixer.D.zero_()


@torch.no_grad()
def init_slow_decay(mixer, generator: torch.Generator, dt_range: tuple[float, float] = SLOW_DT) -> None:
    """in_proj.bias of the A_log rows = softplus^-1(dt), one dt per value head, log-uniform in dt_range: with the
    rows' weights near zero, a_t = exp(-softplus(A_log_t)) starts near exp(-dt) for every token."""
    if mixer.in_proj.bias is None:
        raise InitError("--init llamba-slow needs the student's in_proj bias (config bias=True)")
    lo, hi = math.log(dt_range[0]), math.log(dt_range[1])
    dt = torch.exp(lo + (hi - lo) * torch.rand(mixer.h, generator=generator))
    mixer.in_proj.bias[mixer.a_rows()] = torch.log(torch.expm1(dt))


def build_student(teacher: nn.Module, init: str = "llamba", seed: int = 0, **overrides) -> LlambaForCausalLM:
    """A Llamba student for a Llama teacher. overrides go to LlambaConfig.from_llama_config (e.g. chunk_size)."""
    if init not in INIT_CHOICES:
        raise InitError(f"--init must be one of {INIT_CHOICES}, got {init!r}")
    if init == "llamba-slow":
        overrides["bias"] = True
    config = student_config(teacher, **overrides)
    torch.manual_seed(seed)
    student = LlambaForCausalLM(config)
    student.config.distillation = {"teacher": getattr(teacher.config, "name_or_path", None) or None}
    # saved as the student's generation_config.json
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = teacher.generation_config.__class__.from_dict(
            teacher.generation_config.to_dict()
        )
    copy_non_mixer(student, teacher)
    if init == "attention":
        tc = teacher.config
        n_heads, n_kv = tc.num_attention_heads, tc.num_key_value_heads
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // n_heads
        if config.d_state != head_dim:
            raise InitError(
                f"--init attention needs d_state == teacher head_dim ({head_dim}), got {config.d_state}"
            )
        if config.n_v_heads != n_heads or config.n_qk_heads != n_heads or config.headdim != head_dim:
            raise InitError(
                f"--init attention needs n_v_heads = n_qk_heads = {n_heads} with headdim {head_dim}; "
                f"got {config.n_v_heads}/{config.n_qk_heads} heads of {config.headdim}"
            )
        for t_layer, s_layer in zip(teacher.model.layers, student.backbone.layers, strict=True):
            init_mixer_from_attention(s_layer.mixer, t_layer.self_attn, n_heads, n_kv, head_dim)
    elif init == "llamba-slow":
        g = torch.Generator().manual_seed(seed + 1)
        for layer in student.backbone.layers:
            init_slow_decay(layer.mixer, g)
    return student
