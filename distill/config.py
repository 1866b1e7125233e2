"""`DistillConfig`: every setting of one distillation run, built once (by the CLI, the demo, a bench or a notebook)
and passed whole to `distill_all` / `distill_stage` (distill/run.py).

    from llamba.distill.config import DistillConfig
    from llamba.distill.run import distill_all
    distill_all(DistillConfig(out="runs/x", tokens=50_000, stage_overrides={3: {"temperature": 2.0}}))

Its fields with an `option(...)` are the command-line options every `llamba distill` command reads (the click options
derive from them, distill/options.py); the options only one stage reads are that stage record's option class
(distill/stages.py) and reach the run through `spec_overrides`. A stage's `StageSpec` is built from the stage
record's defaults, then this config's spec fields, `spec_overrides` and `stage_overrides[k]`, in that order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from llamba.distill.distributed import STRATEGIES, TEACHER_STRATEGIES
from llamba.distill.init import INIT_CHOICES
from llamba.distill.options import cli_fields, option
from llamba.distill.stages import (
    DEFAULT_BATCH,
    DEFAULT_LR,
    DEFAULT_SEQ_LEN,
    PRECISIONS,
    STAGES,
    TOKEN_SHARE,
    StageSpec,
    default_spec,
)
from llamba.errors import UsageError

# BENCHMARKS.md, "Chat faithfulness": the budget that fits `llamba demo` in 20 min wall on an idle 2-core CPU with
# bf16 instructions (chat data: 100,000 tokens took 12.8 min end to end, 150,000 took 19.9 min; more tokens is the
# lever that moved every chat figure).
DEFAULT_TOTAL_TOKENS = 150_000


@dataclass
class DistillConfig:
    """One distillation run (what `llamba distill all` / `stageK` read; stage-only options: `spec_overrides`)."""

    teacher: Any = option(
        "default", "'default' (embedded SmolLM2-135M-Instruct), a .gguf file, a HF directory or hub name."
    )  # or a loaded distill.teacher.Teacher
    data: str | None = option(
        None,
        "default: 'chat', conversations sampled from the teacher with its chat "
        "template (shipped for the embedded teacher, else sampled once and cached; "
        "'chat:N' for N of them); 'python-docs' for CPython's language reference; a "
        ".txt/.jsonl/.parquet file or directory; or a HF dataset name.",
    )
    text_field: str = option("text", "Field holding the text in JSONL/Parquet.")
    out: str = option(
        "runs/distill",
        "Run directory (re-run the same command to resume; another teacher, data or setting is refused).",
    )
    tokens: int | None = option(
        None,
        f"Token budget: in `all` the total (default {DEFAULT_TOTAL_TOKENS:,}), split over the stages by the "
        f"records' token shares {TOKEN_SHARE}; in `stageK` that stage's (default: its share of the total).",
        low=1,
    )
    seq_len: int | None = option(None, f"Sequence length (default per stage: {DEFAULT_SEQ_LEN}).", low=2)
    batch_size: int | None = option(
        None, f"Sequences per micro-batch (default per stage: {DEFAULT_BATCH}).", low=1
    )
    grad_accum: int | None = option(None, f"Micro-batches per step ({StageSpec.grad_accum}).", low=1)
    lr: float | None = option(
        None, f"Peak LR of the WSD schedule (default per stage: {DEFAULT_LR}).", low=0, low_open=True
    )
    seed: int = option(StageSpec.seed, "Seed of the student init and the batch order.")
    init: str = option("llamba", "Mixer init of the student (stage 1 start).", choices=INIT_CHOICES)
    qk_heads: int | None = option(
        None,
        "B/C head groups of the student's mixers (n_qk_heads; default: one per "
        "teacher attention head). The teacher's KV-head count (3 for SmolLM2) shares "
        "B and C like GQA shares K and V: fewer weights and a faster forward; see "
        "BENCHMARKS.md for its quality cost.",
        low=1,
    )
    precision: str = option(
        StageSpec.precision,
        "auto = bf16 on a GPU that supports it (FSDP2: bf16 params/compute, "
        "fp32 master weights and reductions; DDP / one process: bf16 autocast) and bf16 autocast on "
        "a CPU with avx512_bf16/amx_bf16 (LLAMBA_CPU_BF16=0 disables), fp32 elsewhere; fp32 turns "
        "both off.",
        choices=PRECISIONS,
    )
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    ckpt_every: float = option(120.0, "Seconds between resumable checkpoints.", low=0)
    no_progress: bool = option(False, "No progress bar.")
    strategy: str = option(
        "auto",
        "Student data parallelism under torchrun: auto = FSDP2 with >1 process, none "
        "with 1; ddp replicates (whole-model stages: the model, per-block stages: each "
        "block).",
        choices=STRATEGIES,
    )
    teacher_strategy: str = option(
        "auto",
        "Teacher under torchrun: replicate, fsdp (FSDP2 per decoder layer), or "
        "auto = fsdp only when the memory plan does not fit with a replicated "
        "teacher.",
        choices=TEACHER_STRATEGIES,
    )
    activation_checkpointing: bool = option(False, "Recompute each block's activations in backward.")
    compile: bool = option(
        False,
        "Run the student's forward through torch.compile in stages 2 and 3 (each block in stage 2, the whole "
        "student in stage 3; inductor, needs a C++ compiler on a CPU; eager with one warning if compiling "
        "fails). The first step of each stage waits for the compile (35-265 s on 2 cores); measured 1.22-1.25x "
        "per step on a CPU with bf16 instructions, none on an fp32-only one (BENCHMARKS.md).",
    )
    threads: int | None = option(
        None,
        "Torch threads per process (default: auto = the cores other processes leave "
        "free, re-checked every 5 s while training, so a busy machine slows a stage "
        "down instead of stalling it at OpenMP barriers).",
        low=1,
    )
    stream: bool = option(
        False,
        "Read --data lazily (JSONL/Parquet files, a directory of them, or a HF dataset in "
        "streaming mode), tokenize and pack on the fly; the data position is checkpointed "
        "and resumes exactly.",
    )
    stream_shards: int = option(
        StageSpec.stream_shards,
        "Virtual shards of the stream: each rank reads its own; the number of processes must divide it.",
        low=1,
    )
    # Not command-line options of every command:
    spec_overrides: dict = field(default_factory=dict)  # StageSpec fields for every stage (the stage options)
    stage_overrides: dict = field(default_factory=dict)  # {k: {StageSpec field: value}} for stage k only
    split: dict | None = None  # {k: share} of `tokens` per stage (default: the stage records' token shares)
    eval_tokens: int = 2048  # held-out tokens of the final teacher vs student evaluation (`distill all`)
    init_from: str | None = (
        None  # a single stage starts from this checkpoint instead of the run's previous stage
    )
    stop_after: int | None = (
        None  # raise run.Interrupted after that many steps of a stage (tests simulate a kill)
    )

    @classmethod
    def of(cls, **settings) -> DistillConfig:
        """A config from keyword arguments: its own fields, and any other StageSpec field into `spec_overrides`
        (`DistillConfig.of(out=..., temperature=2.0)`). An unknown name is refused."""
        own = {f.name for f in dataclasses.fields(cls)}
        spec = {f.name for f in dataclasses.fields(StageSpec)} - {"stage", "tokens"}
        unknown = sorted(set(settings) - own - spec)
        if unknown:
            raise UsageError(f"unknown distillation setting {unknown[0]!r}")
        cfg = cls(**{k: v for k, v in settings.items() if k in own})
        cfg.spec_overrides = {**cfg.spec_overrides, **{k: v for k, v in settings.items() if k not in own}}
        return cfg

    @property
    def progress(self) -> bool:
        return not self.no_progress

    def settings(self, stage: int) -> dict:
        """The StageSpec fields this config sets for `stage` (None: the stage record's default)."""
        own = {k: getattr(self, k) for k in SPEC_FIELDS if getattr(self, k) is not None}
        return {**own, **self.spec_overrides, **self.stage_overrides.get(stage, {})}

    def spec(self, stage: int, tokens: int) -> StageSpec:
        """Stage `stage`'s settings with a budget of `tokens` (validated: a bad value is refused here)."""
        return default_spec(stage, tokens, **self.settings(stage))


# The config fields that are StageSpec fields too (the rest say what to distil, where, and how to run it).
SPEC_FIELDS = tuple(
    f.name
    for f in cli_fields(DistillConfig)
    if f.name in {s.name for s in dataclasses.fields(StageSpec)} - {"stage", "tokens"}
)

# Every setting a user can pass as `--name` to some `llamba distill` command (errors name the flag).
CLI_NAMES = frozenset(
    [f.name for f in cli_fields(DistillConfig)]
    + [f.name for s in STAGES.values() for f in cli_fields(s.options)]
)
