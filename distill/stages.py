"""The three MOHAWK stages (reference §4): what each one trains and how it computes its loss on one batch.

Every stage reads the teacher through its own forward (hooks, teacher.py); the training loop shared by all three
lives in run.py. A `StageSpec` holds every setting of one stage and is stored beside its checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from llamba.distill.losses import hidden_alignment_loss, kd_loss, matrix_orientation_loss
from llamba.distill.teacher import AttentionMaps, teacher_residuals
from llamba.distill.teacher_cache import TeacherStateCache

# Defaults for budgets a laptop can spend (tens of thousands of tokens), measured with bench/bench_quality.py
# (BENCHMARKS.md, "Distillation quality vs compute"). The reference (§4.4, Llamba-1B, billions of tokens) uses LR
# 1e-4 / 1e-4 / 5e-5 and tokens 300M / 2.7B / 5B; at a few dozen steps those LRs barely move the student.
DEFAULT_LR = {1: 1e-3, 2: 1e-3, 3: 3e-4}
# Stage 1 gets one or two steps: at these budgets it does not change the per-layer error; stage 2 (layer-local,
# teacher-forced, cached teacher states) is where the cheap progress is.
TOKEN_SHARE = {1: 0.02, 2: 0.48, 3: 0.50}
# Stage 1 compares l x l maps per head: short sequences keep it cheap. Small micro-batches of short rows give 4x
# the optimizer steps per token of 4 x 256, the largest single gain measured at small budgets.
DEFAULT_SEQ_LEN = {1: 64, 2: 128, 3: 128}
DEFAULT_BATCH = {1: 4, 2: 2, 3: 2}
# Stage 2 is layer-local and teacher-forced: several passes over fewer rows reuse the cached teacher states.
DEFAULT_EPOCHS = {1: 1, 2: 4, 3: 1}
# precision 'auto' on a CPU with bf16 instructions: bf16 autocast (1.4x the tokens per CPU-second at equal or better
# held-out quality, BENCHMARKS.md "Distillation quality vs compute"). LLAMBA_CPU_BF16=0 turns it off (the tests do).
CPU_AUTO_BF16 = os.environ.get("LLAMBA_CPU_BF16", "1") != "0"


@dataclasses.dataclass
class StageSpec:
    stage: int
    tokens: int  # token budget of this stage
    seq_len: int = 256
    batch_size: int = 4  # sequences per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup: float = 0.1  # WSD fractions
    decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    precision: str = "auto"  # auto (bf16 autocast on a GPU / CPU with bf16 instructions) | bf16 | fp32
    temperature: float = 1.0  # stage 3
    hard_weight: float = 0.0  # stage 3
    freeze_mlp: bool = False  # stage 3
    mixer_only: bool = False  # stage 2
    epochs: int = 1  # stage 2: passes over tokens / epochs distinct tokens, teacher states cached (teacher_cache.py)
    stream: bool = False  # read --data lazily (distill/stream.py) instead of packing it in memory
    stream_shards: int = 8  # virtual shards of the stream; the number of processes must divide it

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum

    @property
    def total_steps(self) -> int:
        return max(1, -(-self.tokens // self.tokens_per_step))

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_json(cls, d: dict) -> StageSpec:
        d = dict(d)
        d["betas"] = tuple(d["betas"])
        return cls(**d)


def default_spec(stage: int, tokens: int, **overrides) -> StageSpec:
    fields = dict(
        stage=stage,
        tokens=tokens,
        seq_len=DEFAULT_SEQ_LEN[stage],
        batch_size=DEFAULT_BATCH[stage],
        lr=DEFAULT_LR[stage],
        epochs=1 if overrides.get("stream") else DEFAULT_EPOCHS[stage],  # a stream is read once
    )
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return StageSpec(**fields)


def split_budget(total_tokens: int, share: dict[int, float] | None = None) -> dict[int, int]:
    """A total token budget split over the stages by `share` (default TOKEN_SHARE); the shares are normalized."""
    share = share or TOKEN_SHARE
    norm = sum(share.values())
    return {k: max(1, int(total_tokens * share.get(k, 0.0) / norm)) for k in (1, 2, 3)}


def bf16_flags(cpuinfo: str) -> list[str]:
    """The bf16 matrix instructions (`avx512_bf16`, `amx_bf16`) among the flags of a /proc/cpuinfo text."""
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return sorted({"avx512_bf16", "amx_bf16"} & set(flags))


@functools.cache
def cpu_bf16() -> bool:
    """Whether this CPU reports native bf16 instructions; False where /proc/cpuinfo does not exist (macOS)."""
    try:
        return bool(bf16_flags(Path("/proc/cpuinfo").read_text()))
    except OSError:
        return False


def use_bf16(spec: StageSpec, device: torch.device) -> bool:
    """precision 'auto': bf16 autocast on a GPU that supports it and on a CPU with bf16 instructions."""
    if spec.precision != "auto":
        return spec.precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and CPU_AUTO_BF16 and cpu_bf16()


def autocast_context(spec: StageSpec, device: torch.device):
    use = use_bf16(spec, device)
    if not use:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Trainable parameters
# --------------------------------------------------------------------------------------------------
def trainable_parameters(student: nn.Module, spec: StageSpec) -> list[tuple[str, nn.Parameter]]:
    """Stage 1: mixers + their input norms, less out_proj and z_bias (the mixing matrix does not involve them,
    so they would get no gradient; DDP needs one for every trainable parameter). Stage 2: whole blocks (mixer +
    input norm with --mixer-only). Stage 3: everything; MLPs frozen with --freeze-mlp (MOHAWK/Phi-Mamba),
    trained by default (Llamba)."""

    def wanted(name: str) -> bool:
        in_block = name.startswith("backbone.layers.")
        if spec.stage == 1:
            return in_block and (".mixer." in name or ".input_layernorm." in name) and not (
                ".mixer.out_proj." in name or name.endswith(".mixer.z_bias"))
        if spec.stage == 2 and spec.mixer_only:
            return in_block and (".mixer." in name or ".input_layernorm." in name)
        if spec.stage == 2:
            return in_block
        return not (spec.freeze_mlp and ".mlp." in name)

    student.requires_grad_(False)
    chosen = []
    for name, p in student.named_parameters():  # tied lm_head/embedding appear once
        if wanted(name):
            p.requires_grad_(True)
            chosen.append((name, p))
    return chosen


def make_optimizer(named: list[tuple[str, nn.Parameter]], spec: StageSpec) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases, D, z_bias, conv taps)."""
    decay = [p for n, p in named if p.ndim >= 2 and "conv1d" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "conv1d" not in n)]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=spec.lr, betas=spec.betas, eps=1e-8)


# --------------------------------------------------------------------------------------------------
# One micro-batch of each stage: forward, backward (scaled for accumulation), losses for the log.
# Stages 1-2 get the student's blocks (plain, FSDP2 units or per-block DDP wrappers), stage 3 the whole model.
# --------------------------------------------------------------------------------------------------
LossStep = Callable[[torch.Tensor, float], tuple[float, list[float] | None]]


def stage1_step(blocks, teacher, spec: StageSpec, device: torch.device) -> LossStep:
    """Matrix orientation. Per layer: teacher attention maps of that layer only (eager, recomputed from the
    teacher's residual stream), student mixing matrix on the same input, backward at once (frees the maps)."""

    def step(ids: torch.Tensor, scale: float):  # ids: (b, l)
        resid = teacher_residuals(teacher, ids)["resid"]
        maps = AttentionMaps(teacher, ids)
        per_layer = []
        try:
            for i, block in enumerate(blocks):
                attn = maps(i, resid[i])  # (b, heads, l, l)
                with autocast_context(spec, device):
                    _, _, matrix = block(resid[i], run_mlp=False, return_matrix=True)
                loss = matrix_orientation_loss(matrix, attn)
                (loss * scale).backward()
                per_layer.append(loss.item())
                del attn, matrix, loss
        finally:
            maps.close()
        return sum(per_layer) / len(per_layer), per_layer

    return step


def stage2_step(blocks, teacher, spec: StageSpec, device: torch.device) -> LossStep:
    """Hidden-state alignment. One teacher forward feeds every layer; layer i maps teacher hidden_states[i] to a
    prediction of hidden_states[i+1] (or, with mixer_only, of the attention output). With spec.epochs > 1 the
    teacher's states of each row are computed once and kept in memory (bf16)."""
    cache = TeacherStateCache(teacher, with_attn_out=spec.mixer_only) if spec.epochs > 1 else None

    def step(ids: torch.Tensor, scale: float):
        out = cache(ids) if cache is not None else teacher_residuals(teacher, ids, with_attn_out=spec.mixer_only)
        per_layer = []
        for i, block in enumerate(blocks):
            with autocast_context(spec, device):
                pred, _, _ = block(out["resid"][i], run_mlp=not spec.mixer_only)
            target = out["attn_out"][i] if spec.mixer_only else out["resid"][i + 1]
            loss = hidden_alignment_loss(pred, target)
            (loss * scale).backward()
            per_layer.append(loss.item())
        return sum(per_layer) / len(per_layer), per_layer

    return step


def stage3_step(student, teacher, spec: StageSpec, device: torch.device) -> LossStep:
    """End-to-end knowledge distillation: soft CE against the teacher's distribution at temperature T."""

    def step(ids: torch.Tensor, scale: float):
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        with autocast_context(spec, device):
            s_logits = student(ids).logits
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        loss = kd_loss(s_logits, t_logits, spec.temperature, labels=labels, hard_weight=spec.hard_weight)
        (loss * scale).backward()
        return loss.item(), None

    return step


STAGE_STEPS = {1: stage1_step, 2: stage2_step, 3: stage3_step}
