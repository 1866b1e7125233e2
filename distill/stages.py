"""The three MOHAWK stages (docs/equations.md §D1): what each one trains and how it computes its loss on one batch.

`STAGES` is the one registry of stages: each `Stage` record names its defaults (LR, token share, sequence length),
which parameters it trains, whether the loop hands its step the student's blocks or the whole model, its step
function and the StageSpec fields only it uses. train.py, run.py and the CLI read everything from it, so adding a stage is
one record plus its step function (and its test); see docs/extending.md.

Every stage reads the teacher through its own forward (hooks, teacher.py); the training loop shared by all three
lives in train.py. A `StageSpec` holds every setting of one stage and is stored beside its checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from llamba.distill.losses import hidden_alignment_loss, kd_loss, linear_kd_loss, matrix_orientation_loss
from llamba.distill.options import option
from llamba.distill.teacher import AttentionMaps, teacher_residuals
from llamba.distill.teacher_cache import TeacherStateCache
from llamba.errors import UsageError
from llamba.jit import compiled

PRECISIONS = ("auto", "bf16", "fp32")
KD_TOKENS = ("assistant", "all")


# The options only one stage reads (its command's --help shows them; `distill all` shows every stage's). Their
# defaults are the StageSpec defaults below.
@dataclasses.dataclass
class Stage1Options:
    pass


@dataclasses.dataclass
class Stage2Options:
    mixer_only: bool = option(False, "Stage 2: align the mixer output to the attention output.")
    epochs: int | None = option(
        None,
        "Stage 2: passes over its tokens, the teacher's states cached in memory "
        "(default: the stage record's, 4; 1 with --stream).",
        low=1,
    )


@dataclasses.dataclass
class Stage3Options:
    temperature: float = option(1.0, "Stage 3 KD temperature.", low=0, low_open=True)
    hard_weight: float = option(0.0, "Stage 3 weight of the hard-label CE.", low=0)
    freeze_mlp: bool = option(False, "Stage 3: freeze MLPs (MOHAWK/Phi-Mamba variant).")
    teacher_bf16: bool = option(
        True,
        "Stage 3: run the teacher's forward under the student's bf16 autocast too "
        "(when the student uses bf16; same held-out quality, 4% less time).",
    )
    kd_tokens: str = option(
        "assistant",
        "Stage 3: the tokens the KD loss is taken on: `assistant` (the answers "
        "and their end-of-turn marker in chat data; every token of plain "
        "text) or `all`.",
        choices=("assistant", "all"),
    )


def _default(cls, name: str):
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


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
    temperature: float = _default(Stage3Options, "temperature")
    hard_weight: float = _default(Stage3Options, "hard_weight")
    freeze_mlp: bool = _default(Stage3Options, "freeze_mlp")
    teacher_bf16: bool = _default(Stage3Options, "teacher_bf16")
    kd_tokens: str = _default(Stage3Options, "kd_tokens")
    mixer_only: bool = _default(Stage2Options, "mixer_only")
    # stage 2: passes over tokens / epochs distinct tokens, teacher states cached (teacher_cache.py)
    epochs: int = 1
    stream: bool = False  # read --data lazily (distill/stream.py) instead of packing it in memory
    stream_shards: int = 8  # virtual shards of the stream; the number of processes must divide it

    def __post_init__(self) -> None:
        """Refuse settings no run can use, one line naming the option (nan and inf included)."""
        if self.stage not in STAGES:
            raise UsageError(f"stage must be one of {sorted(STAGES)}, got {self.stage!r}")
        for name in ("lr", "temperature", "clip"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v!r}")
        for name in ("hard_weight", "weight_decay", "warmup", "decay"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v!r}")
        if self.warmup + self.decay > 1:
            raise UsageError(
                f"warmup + decay must be <= 1 (fractions of the steps), got {self.warmup + self.decay}"
            )
        for name, low in (
            ("tokens", 1),
            ("seq_len", 2),
            ("batch_size", 1),
            ("grad_accum", 1),
            ("stream_shards", 1),
            ("epochs", 1),
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise UsageError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")
        # a run does at most twice its budget (one rounded-up step)
        if self.tokens_per_step > 2 * self.tokens:
            raise UsageError(
                f"stage {self.stage}: its budget of {self.tokens} tokens is less than half of one optimizer step "
                f"({self.tokens_per_step} tokens = --seq-len {self.seq_len} x --batch-size {self.batch_size} x "
                f"--grad-accum {self.grad_accum}); raise --tokens or lower --batch-size / --seq-len"
            )
        if self.kd_tokens not in KD_TOKENS:
            raise UsageError(f"--kd-tokens must be one of {', '.join(KD_TOKENS)}, got {self.kd_tokens!r}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

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
    """The StageSpec of `stage` with its registry defaults, then every override that is not None."""
    if stage not in STAGES:
        raise UsageError(f"stage must be one of {sorted(STAGES)}, got {stage!r}")
    record = STAGES[stage]
    fields = dict(
        stage=stage,
        tokens=tokens,
        seq_len=record.seq_len,
        batch_size=record.batch_size,
        lr=record.lr,
        epochs=1 if overrides.get("stream") else record.epochs,
    )  # a stream is read once
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return StageSpec(**fields)


def split_budget(total_tokens: int, share: dict[int, float] | None = None) -> dict[int, int]:
    """A total token budget split over the stages by `share` (default: the records' token shares), normalized."""
    share = share or {k: s.token_share for k, s in STAGES.items()}
    norm = sum(share.values())
    return {k: max(1, int(total_tokens * share.get(k, 0.0) / norm)) for k in STAGES}


def bf16_flags(cpuinfo: str) -> list[str]:
    """The bf16 matrix instructions (`avx512_bf16`, `amx_bf16`) among the flags of a /proc/cpuinfo text."""
    flags = next(
        (line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []
    )
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
    trained by default (Llamba); the rule is the stage record's `trains`."""
    wanted = STAGES[spec.stage].trains
    student.requires_grad_(False)
    chosen = []
    for name, p in student.named_parameters():  # tied lm_head/embedding appear once
        if wanted(name, spec):
            p.requires_grad_(True)
            chosen.append((name, p))
    return chosen


def make_optimizer(named: list[tuple[str, nn.Parameter]], spec: StageSpec) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases, D, z_bias, conv taps)."""
    decay = [p for n, p in named if p.ndim >= 2 and "conv1d" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "conv1d" not in n)]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=spec.lr,
        betas=spec.betas,
        eps=1e-8,
        fused=fused_adamw([p for _, p in named]),
    )


def fused_adamw(params: list[nn.Parameter]) -> bool:
    """The fused AdamW kernel (one pass over each tensor instead of foreach's several: on a 2-core CPU the update of
    the 158M-parameter student takes 0.30 s instead of 1.10 s, a fifth of a stage-3 step) for plain fp32/bf16
    tensors on a CPU or GPU; sharded (DTensor) parameters keep the foreach update. Same math either way
    (tests/test_distill_stages.py)."""
    return bool(params) and all(
        type(p.data) is torch.Tensor
        and p.device.type in ("cpu", "cuda")
        and p.dtype in (torch.float32, torch.bfloat16)
        for p in params
    )


# --------------------------------------------------------------------------------------------------
# One micro-batch of each stage: forward, backward (scaled for accumulation), losses for the log.
# Stages 1-2 get the student's blocks (plain, FSDP2 units or per-block DDP wrappers), stage 3 the whole model.
# --------------------------------------------------------------------------------------------------
LossStep = Callable[[torch.Tensor, float], tuple[float, list[float] | None]]


def stage1_step(
    blocks, teacher, spec: StageSpec, device: torch.device, markers=None, compile=False
) -> LossStep:
    """Matrix orientation. Per layer: teacher attention maps of that layer only (eager, recomputed from the
    teacher's residual stream), student mixing matrix on the same input, backward at once (frees the maps).
    Always eager (`compile` is ignored): the stage runs a few dozen steps, less than one compile costs."""

    def step(ids: torch.Tensor, scale: float):  # ids: (b, l)
        resid = teacher_residuals(teacher, ids)["resid"]
        per_layer = []
        with AttentionMaps(teacher, ids) as maps:
            for i, block in enumerate(blocks):
                attn = maps(i, resid[i])  # (b, heads, l, l)
                with autocast_context(spec, device):
                    _, _, matrix = block(resid[i], run_mlp=False, return_matrix=True)
                loss = matrix_orientation_loss(matrix, attn)
                (loss * scale).backward()
                per_layer.append(loss.item())
                del attn, matrix, loss
        return sum(per_layer) / len(per_layer), per_layer

    return step


def stage2_step(
    blocks, teacher, spec: StageSpec, device: torch.device, markers=None, compile=False
) -> LossStep:
    """Hidden-state alignment. One teacher forward feeds every layer; layer i maps teacher hidden_states[i] to a
    prediction of hidden_states[i+1] (or, with mixer_only, of the attention output). With spec.epochs > 1 the
    teacher's states of each row are computed once and kept in memory (bf16). `compile`: every block's forward
    through torch.compile (one graph for all blocks; eager if compiling fails)."""
    cache = TeacherStateCache(teacher, with_attn_out=spec.mixer_only) if spec.epochs > 1 else None
    if compile:
        blocks = [compiled(b, "a student block", dynamic=False) for b in blocks]

    def step(ids: torch.Tensor, scale: float):
        out = (
            cache(ids)
            if cache is not None
            else teacher_residuals(teacher, ids, with_attn_out=spec.mixer_only)
        )
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


def stage3_step(
    student, teacher, spec: StageSpec, device: torch.device, markers=None, compile=False
) -> LossStep:
    """End-to-end knowledge distillation: soft CE against the teacher's distribution at temperature T, on the
    positions that predict an assistant token (kd_tokens 'assistant', with the tokenizer's chat `markers`; plain-text
    rows count whole) or on every position.

    One process, plain modules (the default): both LM heads run on the counted positions only and the student's head
    is fused with the loss (losses.linear_kd_loss), so no (b, l, vocab) student logits are kept. A wrapped student
    (DDP / FSDP2) or a sharded teacher goes through the models' own forwards and kd_loss: the same loss.
    `compile`: the student's forward (to its final hidden states, or its logits when wrapped) through torch.compile
    (eager if compiling fails); the teacher stays eager (compiling it measured no faster)."""
    from llamba.distill.chat_data import assistant_mask

    fused = not (hasattr(student, "unshard") or hasattr(student, "module") or hasattr(teacher, "unshard"))
    bf16 = use_bf16(spec, device)
    forward = student.final_hidden if fused else student
    if compile:
        forward = compiled(forward, "the student's forward", dynamic=False)

    def counted(ids: torch.Tensor) -> torch.Tensor | None:  # ids: (b, l) -> (b, l) bool or None (all)
        if spec.kd_tokens != "assistant" or markers is None:
            return None
        target = assistant_mask(ids, markers)  # (b, l): position i predicts token i + 1
        return torch.cat([target[:, 1:], torch.zeros_like(target[:, :1])], dim=1)

    def teacher_context():
        return autocast_context(spec, device) if spec.teacher_bf16 else contextlib.nullcontext()

    def step(ids: torch.Tensor, scale: float):
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        weights = counted(ids)
        if not fused:
            with torch.no_grad(), teacher_context():
                t_logits = teacher(input_ids=ids).logits
            with autocast_context(spec, device):
                s_logits = forward(ids).logits
            loss = kd_loss(
                s_logits,
                t_logits,
                spec.temperature,
                labels=labels,
                hard_weight=spec.hard_weight,
                weights=weights,
            )
        else:
            sel = torch.ones_like(ids, dtype=torch.bool) if weights is None else weights.bool()
            with torch.no_grad(), teacher_context():
                t_hidden = teacher.model(input_ids=ids).last_hidden_state  # (b, l, d)
                t_logits = teacher.lm_head(t_hidden[sel])  # (n, v)
            with autocast_context(spec, device):
                h = forward(ids)[sel]  # (n, d)
            loss = linear_kd_loss(
                h,
                student.lm_head.weight,
                t_logits,
                spec.temperature,
                labels=labels[sel],
                hard_weight=spec.hard_weight,
                dtype=torch.bfloat16 if bf16 else torch.float32,
            )
        (loss * scale).backward()
        return loss.item(), None

    return step


# --------------------------------------------------------------------------------------------------
# What each stage trains (parameter names of LlambaForCausalLM)
# --------------------------------------------------------------------------------------------------
def _in_block(name: str) -> bool:
    return name.startswith("backbone.layers.")


def _trains_stage1(name: str, spec: StageSpec) -> bool:
    return (
        _in_block(name)
        and (".mixer." in name or ".input_layernorm." in name)
        and not (".mixer.out_proj." in name or name.endswith(".mixer.z_bias"))
    )


def _trains_stage2(name: str, spec: StageSpec) -> bool:
    if spec.mixer_only:
        return _in_block(name) and (".mixer." in name or ".input_layernorm." in name)
    return _in_block(name)


def _trains_stage3(name: str, spec: StageSpec) -> bool:
    return not (spec.freeze_mlp and ".mlp." in name)


def _stage1_memory(spec: StageSpec, teacher_config, world_size: int) -> float:
    """One layer's l x l maps at a time, fp32, per query head: the teacher's maps, the student's mixing matrix, its
    gradient and the loss's temporary (4 of them), for this rank's rows of a micro-batch."""
    rows = max(1, spec.batch_size // world_size)
    return 4 * 4 * rows * teacher_config.num_attention_heads * spec.seq_len**2


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Stage:
    number: int
    name: str  # the CLI sub-command is f"stage{number}"; `name` is its one-line description
    lr: float  # default peak LR
    token_share: float  # of `distill all --tokens`
    seq_len: int
    batch_size: int
    trains: Callable[[str, StageSpec], bool]  # parameter name -> trained in this stage
    per_block: bool  # the step gets the student's blocks (True) or the whole model (False)
    step: Callable[..., LossStep]  # (blocks | model, teacher, spec, device, markers, compile) -> LossStep
    options: type = Stage1Options  # dataclass of the StageSpec fields only this stage reads (its CLI options)
    memory: Callable[[StageSpec, object, int], float] | None = None  # (spec, teacher config, ranks) -> bytes
    epochs: int = 1  # default passes over the stage's tokens (stage 2 reuses cached teacher states)

    def extra_bytes(self, spec: StageSpec, teacher_config, world_size: int = 1) -> float:
        """Per-rank bytes this stage holds beyond the generic plan (0 when it has no estimate)."""
        return float(self.memory(spec, teacher_config, world_size)) if self.memory else 0.0


# Defaults for budgets a laptop can spend (tens of thousands of tokens), measured with bench/bench_quality.py
# (BENCHMARKS.md, "Distillation quality vs compute"; at 24k tokens stage-2 LR 1e-3 beat 5e-4 and 3e-3, stage-3
# 1.5e-4 beat 3e-4 and 1e-3). The reference (§4.4, Llamba-1B, billions of tokens) uses LR 1e-4 / 1e-4 / 5e-5
# and token shares 3.75 / 33.75 / 62.5%; at a few dozen steps those LRs barely move the student.
# Stage 1 gets one or two steps (at these budgets it does not change the per-layer error) and compares l x l maps per
# head, so its rows are short; stage 2 (layer-local, teacher-forced, 4 passes over cached teacher states) is where
# the cheap progress is. Stages 2-3 take micro-batches of 1 x 128 tokens: more optimizer steps per token is the
# largest single gain measured at small budgets (2 x 128 gave 4x the steps of 4 x 256; on chat data at 100,000 tokens
# 1 x 128 beat 2 x 128 on every chat figure: BENCHMARKS.md, "Chat faithfulness", lever `b1s128`).
STAGES: dict[int, Stage] = {
    1: Stage(
        number=1,
        name="matrix orientation",
        lr=1e-3,
        token_share=0.02,
        seq_len=64,
        batch_size=4,
        trains=_trains_stage1,
        per_block=True,
        step=stage1_step,
        options=Stage1Options,
        memory=_stage1_memory,
    ),
    2: Stage(
        number=2,
        name="hidden-state alignment",
        lr=1e-3,
        token_share=0.48,
        seq_len=128,
        batch_size=1,
        trains=_trains_stage2,
        per_block=True,
        step=stage2_step,
        options=Stage2Options,
        epochs=4,
    ),
    3: Stage(
        number=3,
        name="end-to-end knowledge distillation",
        lr=1.5e-4,
        token_share=0.50,
        seq_len=128,
        batch_size=1,
        trains=_trains_stage3,
        per_block=False,
        step=stage3_step,
        options=Stage3Options,
    ),
}

# Views of the registry (kept for readers of the old per-stage dicts).
DEFAULT_LR = {k: s.lr for k, s in STAGES.items()}
TOKEN_SHARE = {k: s.token_share for k, s in STAGES.items()}
DEFAULT_SEQ_LEN = {k: s.seq_len for k, s in STAGES.items()}
DEFAULT_BATCH = {k: s.batch_size for k, s in STAGES.items()}
