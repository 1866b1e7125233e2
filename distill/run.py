"""The training loop shared by the stages, resume, and the pipeline (init -> stage 1 -> 2 -> 3 -> eval).

    setup_stage   the stage's model (wrapped for 1 or N processes), optimizer, loss step and data
    train_step    one optimizer step: micro-batches, clipping, the non-finite guard, the metrics row
    Checkpointer  the stateful parts (student, optimizer, step, data position) in resume/ (DCP, atomic)
    train_stage   the loop: resume, steps, timed checkpoints, final checkpoint + DONE.json
The run directory (what each file is, how it is written and read back) is distill/rundir.py.

Kill the process (any rank of a torchrun job) at any moment and re-run the same command: finished stages are
skipped and a running stage continues from its last resume/, reading the same batches it would have read
(in-memory batches are a function of the step; a stream restores its saved position), so the result equals an
uninterrupted run. A re-run with another teacher, data, init or stage setting is refused, naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llamba.atomic import clean_stale
from llamba.card import CARD_METRICS
from llamba.checkpoints import load_model, record_distillation
from llamba.distill.chat_data import ChatMarkers
from llamba.distill.data import TokenData, build_token_data, load_documents
from llamba.distill.distributed import (
    DistContext,
    available_memory_gib,
    bf16_supported,
    check_memory_plan,
    ddp_blocks,
    full_state_dict,
    load_sharded,
    memory_plan,
    resolve_strategy,
    resolve_teacher_strategy,
    save_sharded,
    unwrap,
    wrap_student,
    wrap_teacher,
)
from llamba.distill.init import build_student
from llamba.distill.plots import plot_stage
from llamba.distill.rundir import RunDir, RunError, StageDir, data_name, read_json, run_identity, write_json
from llamba.distill.schedule import wsd_lr
from llamba.distill.stages import (
    STAGES,
    StageSpec,
    default_spec,
    make_optimizer,
    split_budget,
    trainable_parameters,
)
from llamba.distill.stream import TokenStream, open_source
from llamba.distill.teacher import Teacher, get_teacher, resolve_device  # noqa: F401  (re-exported)
from llamba.distill.teacher_cache import epoch_pool
from llamba.errors import LlambaError, ResourceError
from llamba.model import LlambaBlock, LlambaForCausalLM
from llamba.threads import ThreadGovernor

# BENCHMARKS.md, "Chat faithfulness": the budget that fits `llamba demo` in 20 min wall on an idle 2-core CPU with
# bf16 instructions (chat data: 100,000 tokens took 12.8 min end to end, 150,000 took 19.9 min; more tokens is the
# lever that moved every chat figure).
DEFAULT_TOTAL_TOKENS = 150_000
CLI_FLAGS = {
    "seq_len",
    "batch_size",
    "grad_accum",
    "lr",
    "seed",
    "precision",
    "temperature",
    "hard_weight",
    "freeze_mlp",
    "teacher_bf16",
    "kd_tokens",
    "mixer_only",
    "epochs",
    "stream",
    "stream_shards",
    "tokens",
}


CARD_KEYS = {key for key, _, _ in CARD_METRICS}


class Interrupted(LlambaError, RuntimeError):
    """Raised by `stop_after` (tests simulate a kill with it, right after a checkpoint)."""


class NonFiniteLoss(RunError):
    """A step produced a nan/inf loss or gradient: training stopped before applying it."""


def say(ctx: DistContext, message: str) -> None:
    """One line for the log, from rank 0 only."""
    if ctx.is_main:
        print(message, flush=True)


def _progress(enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tok_s]:.0f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


# --------------------------------------------------------------------------------------------------
# Settings of a stage, as recorded in spec.json
# --------------------------------------------------------------------------------------------------
def stage_record(spec: StageSpec, start: str | None) -> dict:
    """spec.json: the StageSpec fields and, when known, where the stage starts from (init, stageK-1, a path)."""
    return {**spec.to_json(), **({"start": start} if start is not None else {})}


def spec_mismatch(old: dict, new: dict) -> str | None:
    """The first field whose value differs (fields missing from an older spec.json read as their defaults)."""
    base = {
        f.name: list(f.default) if isinstance(f.default, tuple) else f.default
        for f in dataclasses.fields(StageSpec)
        if f.default is not dataclasses.MISSING
    }
    base["start"] = new.get("start")
    old = {**base, **old}
    return next((k for k, v in new.items() if old.get(k) != v), None)


def _flag(key: str) -> str:
    return (
        "--" + key.replace("_", "-") if key in CLI_FLAGS else "--init-from" if key == "start" else f"`{key}`"
    )


def check_spec(new: dict, sdir: StageDir, ctx: DistContext, finished: bool = False) -> None:
    """Refuse to resume (or to reuse a finished stage) with other settings, naming the field and the old value;
    make sure every rank runs rank 0's settings (so all agree on the token budget and the steps)."""
    old = sdir.spec()
    key = spec_mismatch(old, new) if old is not None and (finished or sdir.resume_dir.is_dir()) else None
    if key is not None:
        was = "finished" if finished else "was started"
        raise RunError(
            f"{sdir.spec_file}: this stage {was} with a different `{key}` ({old.get(key)!r} vs "
            f"{new[key]!r}); use a new --out, or {_flag(key)} {old.get(key)} to "
            f"{'keep its result' if finished else 'continue it'}"
        )
    first = ctx.broadcast_object(new)
    diff = [k for k, v in new.items() if first.get(k) != v]
    if diff:
        raise RunError(
            f"rank {ctx.rank}: `{diff[0]}` is {new[diff[0]]!r} here but {first[diff[0]]!r} on rank 0; "
            "launch every rank with the same command"
        )


# --------------------------------------------------------------------------------------------------
# Setup, step, checkpointer, loop
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    step: int = 0
    elapsed: float = 0.0
    metrics: list[dict] = field(default_factory=list)


@dataclass
class StageRun:
    """Everything one stage trains with (returned by `setup_stage`)."""

    spec: StageSpec
    student: LlambaForCausalLM  # the plain module (its parameters are the trained ones)
    model: torch.nn.Module  # the student as wrapped (FSDP2 / DDP / plain)
    opt: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    loss_step: object  # stages.LossStep
    data: TokenData | TokenStream
    ctx: DistContext
    device: torch.device
    strategy: str
    teacher_strategy: str
    plan_line: str


def setup_stage(
    spec: StageSpec,
    student: LlambaForCausalLM,
    teacher: Teacher,
    data,
    device: torch.device,
    ctx: DistContext,
    strategy: str = "auto",
    activation_checkpointing: bool = False,
    teacher_strategy: str = "auto",
) -> StageRun:
    """Choose the trained parameters, check the memory plan, shard or replicate teacher and student, build the
    optimizer and the stage's loss step (from the stage registry: per-block stages get the blocks, the others
    the whole model)."""
    record = STAGES[spec.stage]
    student.to(device).train()
    trainable_parameters(student, spec)
    strategy = resolve_strategy(strategy, ctx)
    sharded_teacher = hasattr(teacher.model, "unshard")  # sharded by an earlier stage of this run
    plan_args = (
        student,
        teacher.model,
        ctx,
        strategy,
        spec.seq_len,
        spec.batch_size // ctx.world_size,
        activation_checkpointing,
    )
    extra = record.extra_bytes(spec, teacher.model.config, ctx.world_size)
    teacher_strategy = (
        "fsdp"
        if sharded_teacher
        else ctx.broadcast_object(  # rank 0's free memory decides
            resolve_teacher_strategy(
                teacher_strategy,
                ctx,
                memory_plan(*plan_args, teacher_strategy="replicate", stage_bytes=extra),
            )
        )
    )
    plan_line = check_memory_plan(
        memory_plan(*plan_args, teacher_strategy=teacher_strategy, stage_bytes=extra), ctx
    )
    if not sharded_teacher:
        wrap_teacher(teacher.model, ctx, teacher_strategy)
    model = wrap_student(
        student,
        ctx,
        strategy,
        LlambaBlock,
        activation_checkpointing,
        mixed_precision=spec.precision != "fp32",
        ddp_per_block=record.per_block,
    )
    named = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
    # Per-block stages call the student's blocks one by one (FSDP2 gathers each block's shards in its own hooks;
    # DDP wraps each block); whole-model stages call the model, through the DDP wrapper when there is one.
    if record.per_block:
        net = ddp_blocks(student.backbone.layers, ctx) if strategy == "ddp" else list(student.backbone.layers)
    else:
        net = model
    return StageRun(
        spec,
        student,
        model,
        make_optimizer(named, spec),
        [p for _, p in named],
        record.step(net, teacher.model, spec, device, ChatMarkers.of(teacher.tokenizer)),
        data,
        ctx,
        device,
        strategy,
        teacher_strategy,
        plan_line,
    )


def train_step(run: StageRun, step: int) -> dict:
    """Optimizer step `step` (0-based): the WSD LR, grad_accum micro-batches of this rank's rows, clipping, the
    update. Returns the metrics row; raises NonFiniteLoss (before updating anything) on a nan/inf loss or
    gradient norm."""
    spec, ctx, t0 = run.spec, run.ctx, time.time()
    lr = wsd_lr(step, spec.total_steps, spec.lr, spec.warmup, spec.decay)
    for group in run.opt.param_groups:
        group["lr"] = lr
    losses, per_layer = [], None
    for micro in range(spec.grad_accum):
        ids = run.data.local_batch(
            step * spec.grad_accum + micro, spec.batch_size, spec.seed, ctx
        )  # (b / N, l)
        loss, layers = run.loss_step(ids.to(run.device), 1.0 / spec.grad_accum)
        losses.append(loss)
        if layers is not None:
            per_layer = (
                layers if per_layer is None else [a + b for a, b in zip(per_layer, layers, strict=True)]
            )
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, spec.clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    loss = ctx.all_reduce_mean(sum(losses) / len(losses))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        run.opt.zero_grad(set_to_none=True)
        raise NonFiniteLoss(
            f"stage {spec.stage}: loss {loss:.4g}, gradient norm {grad_norm:.4g} at step "
            f"{step + 1}/{spec.total_steps}"
        )
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    dt = time.time() - t0
    row = {
        "step": step + 1,
        "tokens": (step + 1) * spec.tokens_per_step,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tok_s": spec.tokens_per_step / dt,
        "elapsed_s": dt,
    }
    if per_layer is not None:
        row["per_layer"] = [ctx.all_reduce_mean(x / spec.grad_accum) for x in per_layer]
    return row


class Checkpointer:
    """The stateful parts of a stage (student, optimizer, step, elapsed time, metrics count, data position) in
    stageK/resume/: DCP (sharded, loads on any number of processes), replaced atomically."""

    def __init__(self, run: StageRun, sdir: StageDir):
        self.run, self.sdir = run, sdir
        self.step: int | None = None  # the step of the checkpoint on disk, when known

    def exists(self) -> bool:
        return self.sdir.resume_dir.is_dir()

    def save(self, state: TrainState) -> None:
        save_sharded(
            self.sdir.resume_dir,
            self.run.model,
            self.run.opt,
            self.run.ctx,
            {
                "step": state.step,
                "elapsed": state.elapsed,
                "metric_lines": len(state.metrics),
                "data": self.run.data.position(self.run.ctx),
            },
        )
        self.step = state.step
        if self.run.ctx.is_main and state.metrics:
            plot_stage(state.metrics, self.sdir.path / "loss.png", f"stage {self.run.spec.stage}")

    def load(self) -> TrainState:
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        try:
            extra = load_sharded(
                self.sdir.resume_dir,
                self.run.model,
                self.run.opt,
                {"step": 0, "elapsed": 0.0, "metric_lines": 0, "data": ""},
            )
        except (Exception, CheckpointException) as e:  # truncated shard, empty .metadata: name it and the fix
            why = (
                type(e).__name__
                if isinstance(e, CheckpointException)
                else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
            raise RunError(
                f"{self.sdir.resume_dir} cannot be read ({why}); delete it to restart stage "
                f"{self.run.spec.stage} from its start"
            ) from None
        self.run.data.restore(extra["data"])
        self.step = int(extra["step"])
        return TrainState(self.step, float(extra["elapsed"]), self.sdir.metrics(int(extra["metric_lines"])))


def _consolidated_student(run: StageRun):
    """A plain LlambaForCausalLM with the full weights on rank 0 (gathered from the shards when sharded; every
    rank must call this), None on the other ranks."""
    # neither FSDP nor DDP: already plain
    if run.model is run.student and not hasattr(run.student, "unshard"):
        return run.student
    state = full_state_dict(run.model)  # collective; only rank 0 receives the tensors
    if not run.ctx.is_main:
        return None
    plain = LlambaForCausalLM(run.student.config)
    plain.load_state_dict(state)
    return plain


def _summary(run: StageRun, state: TrainState) -> dict:
    spec, metrics = run.spec, state.metrics
    tail = metrics[-max(1, len(metrics) // 10) :]
    summary = {
        "stage": spec.stage,
        "steps": spec.total_steps,
        "tokens": spec.total_steps * spec.tokens_per_step,
        "final_loss": sum(m["loss"] for m in tail) / len(tail),
        "elapsed_s": round(state.elapsed, 1),
        "tok_s": round(spec.total_steps * spec.tokens_per_step / max(state.elapsed, 1e-9), 1),
        "world_size": run.ctx.world_size,
        "strategy": run.strategy,
        "teacher_strategy": run.teacher_strategy,
    }
    if tail and "per_layer" in tail[-1]:
        summary["per_layer"] = [
            sum(m["per_layer"][i] for m in tail) / len(tail) for i in range(len(tail[-1]["per_layer"]))
        ]
    return summary


def train_stage(
    spec: StageSpec,
    student: LlambaForCausalLM,
    teacher: Teacher,
    data: TokenData | TokenStream,
    stage_dir: Path,
    device: torch.device,
    progress: bool = True,
    ckpt_every_s: float = 120.0,
    stop_after: int | None = None,
    ctx: DistContext | None = None,
    strategy: str = "auto",
    activation_checkpointing: bool = False,
    teacher_strategy: str = "auto",
    start: str | None = None,
) -> dict:
    """Train one stage from step 0 or from stage_dir/resume (a DCP checkpoint that loads on any number of
    processes); write the final checkpoint, metrics and plot. The same loop serves one process and N
    (torchrun): `ctx` gives each rank its rows of every global batch, `strategy` shards (fsdp) or replicates (ddp)
    the student, `teacher_strategy` shards (fsdp) or replicates the teacher (auto: sharded only when the memory
    plan needs it), only rank 0 writes files and draws the progress bar.

    start: where the student came from (recorded in spec.json; a resume from elsewhere is refused).
    stop_after: raise Interrupted after that many optimizer steps of this call (a checkpoint is written first)."""
    ctx = ctx or DistContext(device=device)
    sdir, main = StageDir(stage_dir, spec.stage), ctx.is_main
    if main:
        sdir.prepare()
    ctx.barrier()
    record = stage_record(spec, start)
    check_spec(record, sdir, ctx)
    if main:
        sdir.write_spec(record)
    run = setup_stage(
        spec, student, teacher, data, device, ctx, strategy, activation_checkpointing, teacher_strategy
    )
    ckpt = Checkpointer(run, sdir)
    state = ckpt.load() if ckpt.exists() else TrainState()
    if state.step:
        say(
            ctx,
            f"stage {spec.stage}: resuming at step {state.step}/{spec.total_steps} from resume/, "
            f"{state.step * spec.tokens_per_step:,} tokens done",
        )
    if main:
        sdir.write_metrics(state.metrics)  # drops rows logged after the checkpoint
    ctx.barrier()
    last_ckpt, done_here, total = time.time(), 0, spec.total_steps
    threads = ThreadGovernor()
    with _progress(progress and main) as bar, sdir.open_log() as log:
        if progress and main:
            bar.console.print(
                f"stage {spec.stage}: {ctx.world_size} process(es), strategy {run.strategy}, "
                f"teacher {run.teacher_strategy}; memory plan: {run.plan_line}"
            )
        task = bar.add_task(
            f"stage {spec.stage}", total=total, completed=state.step, loss=float("nan"), tok_s=0.0
        )
        while state.step < total:
            threads.update()
            try:
                row = train_step(run, state.step)
            except NonFiniteLoss as e:
                raise NonFiniteLoss(
                    f"{e}; stopped without applying it, {_kept(ckpt, sdir)}; check the teacher's "
                    f"weights, or retry with a lower --lr (now {spec.lr:g}) in a new --out (or "
                    f"after deleting {sdir.path})"
                ) from None
            row["threads"] = threads.threads
            state.step, state.elapsed = row["step"], state.elapsed + row["elapsed_s"]
            row["elapsed_s"] = round(state.elapsed, 3)
            state.metrics.append(row)
            if main:
                log.write(json.dumps(row) + "\n")
                log.flush()
            bar.update(task, completed=state.step, loss=row["loss"], tok_s=row["tok_s"])
            done_here += 1
            stop = stop_after is not None and done_here >= stop_after
            due = ctx.broadcast_object(
                time.time() - last_ckpt >= ckpt_every_s
            )  # all ranks checkpoint together
            if state.step < total and (stop or due):
                ckpt.save(state)
                last_ckpt = time.time()
            if stop and state.step < total:
                raise Interrupted(f"stopped after {done_here} steps (step {state.step}/{total})")
    return finish_stage(run, state, sdir, teacher)


def _kept(ckpt: Checkpointer, sdir: StageDir) -> str:
    if ckpt.exists():
        at = f" at step {ckpt.step}" if ckpt.step is not None else ""
        return f"the last good checkpoint {sdir.resume_dir}{at} is kept (a re-run resumes there)"
    return "no checkpoint of this stage was written yet (a re-run starts it again)"


def finish_stage(run: StageRun, state: TrainState, sdir: StageDir, teacher: Teacher) -> dict:
    """Gather the weights, write the final checkpoint, the plot and DONE.json (last), drop resume/."""
    final = _consolidated_student(run)
    summary = _summary(run, state)
    if run.ctx.is_main:
        final.eval()
        sdir.save_weights(final, teacher.tokenizer)
        plot_stage(state.metrics, sdir.path / "loss.png", f"stage {run.spec.stage}")
        sdir.write_done(summary)
        shutil.rmtree(sdir.resume_dir, ignore_errors=True)
    run.ctx.barrier()
    return summary


# --------------------------------------------------------------------------------------------------
# Stages and the whole pipeline
# --------------------------------------------------------------------------------------------------
def start_name(stage: int, init_from: str | Path | None) -> str:
    """Where a stage's student comes from, as recorded in spec.json."""
    if init_from is not None:
        return str(Path(init_from).resolve())
    return "init" if stage == min(STAGES) else f"stage{stage - 1}"


def stage_start(
    out: Path,
    stage: int,
    teacher: Teacher,
    init: str,
    init_from: str | Path | None,
    seed: int,
    device: torch.device,
    ctx: DistContext | None = None,
    qk_heads: int | None = None,
) -> LlambaForCausalLM:
    """The student a stage starts from: --init-from, else the previous stage of this run, else (the first stage)
    the initialized student saved under RUN_DIR/init (built once by rank 0, so re-runs and all ranks start from the
    same weights)."""
    ctx = ctx or DistContext(device=device)
    if init_from is not None:
        return load_model(init_from, device=device)
    if stage > min(STAGES):
        prev = RunDir(out).stage(stage - 1)
        if prev.done() is None:
            raise RunError(
                f"{prev.done_file}: stage {stage - 1} has not finished in this run; run it first "
                "(or pass --init-from CHECKPOINT)"
            )
        return load_model(prev.path, device=device)
    init_dir = RunDir(out).init_dir
    qk = student_qk_heads(teacher, qk_heads)
    if ctx.is_main and not (init_dir / "config.json").is_file():
        student = build_student(teacher.model, init=init, seed=seed, n_qk_heads=qk)
        StageDir(init_dir).save_weights(student, teacher.tokenizer)
        write_json(init_dir / "init.json", {"init": init, "seed": seed, "qk_heads": qk}, indent=None)
    ctx.barrier()
    student = load_model(init_dir, device=device)
    if student.config.n_qk_heads != qk:  # a run begun before run.json recorded qk_heads
        raise RunError(
            f"{init_dir}: this run's student has {student.config.n_qk_heads} B/C heads (now --qk-heads "
            f"{qk}); use a new --out, or pass --qk-heads {student.config.n_qk_heads} to continue it"
        )
    return student


def student_qk_heads(teacher: Teacher, qk_heads: int | None) -> int:
    """The student's B/C head groups: --qk-heads, else one per teacher attention head. Must divide the heads."""
    heads = teacher.model.config.num_attention_heads
    if qk_heads is None:
        return heads
    if qk_heads < 1 or heads % qk_heads:
        kv = getattr(teacher.model.config, "num_key_value_heads", None) or heads
        raise RunError(
            f"--qk-heads {qk_heads} must divide the teacher's {heads} attention heads (e.g. its {kv} KV "
            f"heads, or {heads}, the default)"
        )
    return qk_heads


def check_stage_memory(spec: StageSpec, t: Teacher, ctx: DistContext) -> None:
    """Before reading any data: refuse a stage whose own memory (stage 1: l x l maps) cannot fit at all."""
    need = STAGES[spec.stage].extra_bytes(spec, t.model.config, ctx.world_size) / 2**30
    free = available_memory_gib(ctx.device)
    if need > free:
        raise ResourceError(
            f"stage {spec.stage} needs {need:.1f} GiB per rank for its attention maps alone (--seq-len "
            f"{spec.seq_len}, --batch-size {spec.batch_size}) but {free:.1f} GiB is free; lower "
            "--seq-len or --batch-size, or use more processes"
        )


def _load_teacher(teacher, ctx: DistContext) -> Teacher:
    return get_teacher(teacher, ctx.device, torch.bfloat16 if bf16_supported(ctx.device) else torch.float32)


def _check_run(
    out: Path, t: Teacher, data, text_field: str, init: str, ctx: DistContext, write: bool = False, **extra
) -> RunDir:
    """Refuse a run directory begun with another teacher, data, init (or `all` budget); with `write`, record them
    (once the data has loaded, so a command that failed on bad input does not claim the directory)."""
    rd = RunDir(out)
    if write and ctx.is_main:
        rd.root.mkdir(parents=True, exist_ok=True)
        clean_stale(rd.root)  # temporaries of writers killed in an earlier run (stage dirs: train_stage)
        clean_stale(rd.init_dir)
    rd.check_identity({**run_identity(t, data, text_field, init), **extra}, write=write and ctx.is_main)
    ctx.barrier()
    return rd


def distill_stage(
    stage: int,
    teacher="default",
    out: str | Path = "runs/distill",
    data=None,
    tokens: int | None = None,
    init: str = "llamba",
    init_from: str | Path | None = None,
    device: str = "auto",
    text_field: str = "text",
    progress: bool = True,
    ckpt_every_s: float = 120.0,
    stop_after: int | None = None,
    docs: list[str] | None = None,
    strategy: str = "auto",
    activation_checkpointing: bool = False,
    teacher_strategy: str = "auto",
    qk_heads: int | None = None,
    _checked: bool = False,
    **spec_overrides,
) -> dict:
    """Run (or resume, or skip when finished) one stage in RUN_DIR `out`. spec_overrides: any StageSpec
    field (seq_len, batch_size, grad_accum, lr, seed, precision, temperature, hard_weight, freeze_mlp,
    mixer_only, stream, stream_shards, ...). Under torchrun every rank runs this same call (see
    distill/distributed.py). Returns the stage summary (also in RUN_DIR/stageK/DONE.json), with
    "already_done": True when the stage had finished before this call (same settings; other settings are
    refused)."""
    out = Path(out)
    ctx = DistContext.from_env(None if device == "auto" else device)
    dev = ctx.device
    tokens = tokens if tokens is not None else split_budget(DEFAULT_TOTAL_TOKENS)[stage]
    spec = default_spec(stage, tokens, **spec_overrides)  # validates the settings before any loading
    if spec.epochs > 1 and spec.stream:
        raise RunError("--epochs > 1 cycles over an in-memory pool of rows; drop --stream or use --epochs 1")
    t = _load_teacher(teacher, ctx)
    check_stage_memory(spec, t, ctx)
    qk = student_qk_heads(t, qk_heads)
    if not _checked:
        _check_run(out, t, data, text_field, init, ctx, qk_heads=qk)
    sdir = RunDir(out).stage(stage)
    record = stage_record(spec, start_name(stage, init_from))
    done = sdir.done()
    if done is not None:
        check_spec(record, sdir, ctx, finished=True)
        say(ctx, f"stage {stage}: already done ({sdir.done_file.name} in {sdir.path}); nothing to train")
        return {**done, "already_done": True}
    if spec.stream:
        source = open_source(data, text_field, t.model, t.tokenizer, docs)
        token_data = TokenStream(source, t.tokenizer, spec.seq_len, spec.stream_shards)
    else:
        if docs is None:
            docs = load_documents(data, text_field, t.model, t.tokenizer)
        token_data = build_token_data(docs, t.tokenizer, spec.seq_len)
        if spec.epochs > 1:
            token_data = epoch_pool(token_data, spec.tokens, spec.epochs, spec.seed)
    if not _checked:
        _check_run(out, t, data, text_field, init, ctx, write=True, qk_heads=qk)
    student = stage_start(out, stage, t, init, init_from, spec.seed, dev, ctx, qk_heads=qk)
    return train_stage(
        spec,
        student,
        t,
        token_data,
        sdir.path,
        dev,
        progress,
        ckpt_every_s,
        stop_after,
        ctx,
        strategy,
        activation_checkpointing,
        teacher_strategy,
        start=record.get("start"),
    )


def distill_all(
    teacher="default",
    out: str | Path = "runs/distill",
    data=None,
    tokens: int = DEFAULT_TOTAL_TOKENS,
    init: str = "llamba",
    device: str = "auto",
    text_field: str = "text",
    eval_tokens: int = 2048,
    progress: bool = True,
    ckpt_every_s: float = 120.0,
    stage_overrides: dict | None = None,
    strategy: str = "auto",
    activation_checkpointing: bool = False,
    teacher_strategy: str = "auto",
    split: dict[int, float] | None = None,
    qk_heads: int | None = None,
    **spec_overrides,
) -> dict:
    """The main job: init -> every stage of the registry in order -> held-out evaluation, resumable at any point.

    tokens: total budget, split over the stages by `split` (default: the stage records' token shares), at least
    one optimizer step each;
    spec_overrides apply to every stage and stage_overrides = {k: {...}} to stage k only. Returns {"init": {...},
    "stages": {k: summary}, "eval": evaluate(...) dict, "out": str, "already_done": bool (everything had
    finished before this call)}; the evaluation is also written to RUN_DIR/eval.json."""
    from llamba.distill.evaluate import evaluate, evaluate_tokens, heldout_rows

    out = Path(out)
    ctx = DistContext.from_env(None if device == "auto" else device)
    dev = ctx.device
    budget = split_budget(tokens, split)
    for k in STAGES:  # validate every stage's settings before loading anything
        settings = {**spec_overrides, **((stage_overrides or {}).get(k, {}))}
        # A stage whose share of a small --tokens is under one optimizer step runs one step (a single stage
        # command refuses such a budget instead: there the user chose it).
        budget[k] = max(budget[k], default_spec(k, 1 << 40, **settings).tokens_per_step)
        default_spec(k, budget[k], **settings)
    t = _load_teacher(teacher, ctx)
    qk = student_qk_heads(t, qk_heads)
    rd = _check_run(out, t, data, text_field, init, ctx, tokens=tokens, qk_heads=qk)
    stream = bool(spec_overrides.get("stream"))
    docs = None if stream else load_documents(data, text_field, t.model, t.tokenizer)
    _check_run(out, t, data, text_field, init, ctx, write=True, tokens=tokens, qk_heads=qk)
    seed = spec_overrides.get("seed") or 0
    result = {"out": str(out), "stages": {}}

    # Evaluations run on every rank (a sharded teacher's forward is a collective); rank 0 writes them.
    init_eval = rd.init_dir / "eval.json"
    student = stage_start(out, min(STAGES), t, init, None, seed, dev, ctx, qk_heads=qk)
    if ctx.broadcast_object(not init_eval.is_file()):
        held = heldout_rows(t, 256, data, text_field, docs, stream)
        n = max(1, min(held.shape[0], eval_tokens // 256))
        ev = evaluate_tokens(student, t.model, held[:n].to(dev), per_layer=False)
        if ctx.is_main:
            write_json(init_eval, ev, indent=None)
    ctx.barrier()
    result["init"] = _read_eval(init_eval)
    del student

    for k in STAGES:
        overrides = {**spec_overrides, **((stage_overrides or {}).get(k, {}))}
        result["stages"][k] = distill_stage(
            k,
            t,
            out,
            data=data,
            tokens=budget[k],
            init=init,
            device=device,
            text_field=text_field,
            progress=progress,
            ckpt_every_s=ckpt_every_s,
            docs=docs,
            strategy=strategy,
            activation_checkpointing=activation_checkpointing,
            teacher_strategy=teacher_strategy,
            qk_heads=qk,
            _checked=True,
            **overrides,
        )
    result["already_done"] = (
        all(s.get("already_done") for s in result["stages"].values()) and rd.eval_file.is_file()
    )
    if ctx.broadcast_object(not rd.eval_file.is_file()):
        ev = evaluate(
            rd.stage(max(STAGES)).path,
            t,
            data,
            docs=docs,
            max_tokens=eval_tokens,
            device=str(dev),
            text_field=text_field,
            stream=stream,
        )
        if ctx.is_main:
            write_json(rd.eval_file, ev)
            chat = {k: v for k, v in ev.get("chat", {}).items() if k in CARD_KEYS}
            record_distillation(
                rd.stage(max(STAGES)).path,
                teacher=teacher if isinstance(teacher, str) else None,
                tokens=tokens,
                ppl_ratio=ev.get("ppl_ratio"),
                data=data_name(data),
                **chat,
            )
    ctx.barrier()
    result["eval"] = _read_eval(rd.eval_file)
    return result


def _read_eval(path: Path) -> dict:
    return read_json(path, "delete it and re-run to evaluate again")
