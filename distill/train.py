"""The training loop of one stage, shared by the three: setup, step, checkpoints, resume.

    setup_stage   the stage's model (wrapped for 1 or N processes), optimizer, loss step and data
    train_step    one optimizer step: micro-batches, clipping, the non-finite guard, the metrics row
    Checkpointer  the stateful parts (student, optimizer, step, data position) in resume/ (DCP, atomic)
    train_stage   the loop: resume, steps, timed checkpoints, final checkpoint + DONE.json
The pipeline that calls it (init -> stage 1 -> 2 -> 3 -> eval) is distill/run.py; the run directory (what each file
is, how it is written and read back) is distill/rundir.py.

Kill the process (any rank of a torchrun job) at any moment and re-run the same command: a running stage continues
from its last resume/, reading the same batches it would have read (in-memory batches are a function of the step; a
stream restores its saved position), so the result equals an uninterrupted run. A resume with another stage setting
is refused, naming the field.
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

from llamba.distill.chat_data import ChatMarkers
from llamba.distill.config import CLI_NAMES, DistillConfig
from llamba.distill.data import TokenData
from llamba.distill.distributed import (
    DistContext,
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
from llamba.distill.plots import plot_stage
from llamba.distill.rundir import RunError, StageDir
from llamba.distill.schedule import wsd_lr
from llamba.distill.stages import STAGES, StageSpec, make_optimizer, trainable_parameters
from llamba.distill.stream import TokenStream
from llamba.distill.teacher import Teacher, resolve_device
from llamba.errors import LlambaError
from llamba.model import LlambaBlock, LlambaForCausalLM
from llamba.threads import ThreadGovernor


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
        "--" + key.replace("_", "-") if key in CLI_NAMES else "--init-from" if key == "start" else f"`{key}`"
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
    ctx: DistContext,
    cfg: DistillConfig,
) -> StageRun:
    """Choose the trained parameters, check the memory plan, shard or replicate teacher and student, build the
    optimizer and the stage's loss step (from the stage registry: per-block stages get the blocks, the others
    the whole model)."""
    record, device = STAGES[spec.stage], ctx.device
    student.to(device).train()
    trainable_parameters(student, spec)
    strategy = resolve_strategy(cfg.strategy, ctx)
    sharded_teacher = hasattr(teacher.model, "unshard")  # sharded by an earlier stage of this run
    rows = (spec.batch_size // ctx.world_size, spec.seq_len)
    extra = record.extra_bytes(spec, teacher.model.config, ctx.world_size)

    def plan(teacher_strategy: str) -> dict[str, float]:
        return memory_plan(
            student, teacher.model, ctx, rows, strategy, teacher_strategy, cfg.activation_checkpointing, extra
        )

    teacher_strategy = (
        "fsdp"
        if sharded_teacher  # rank 0's free memory decides
        else ctx.broadcast_object(resolve_teacher_strategy(cfg.teacher_strategy, ctx, plan("replicate")))
    )
    plan_line = check_memory_plan(plan(teacher_strategy), ctx)
    if not sharded_teacher:
        wrap_teacher(teacher.model, ctx, teacher_strategy)
    model = wrap_student(
        student,
        ctx,
        strategy,
        LlambaBlock,
        cfg.activation_checkpointing,
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
        record.step(net, teacher.model, spec, device, ChatMarkers.of(teacher.tokenizer), cfg.compile),
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
    cfg: DistillConfig | None = None,
    ctx: DistContext | None = None,
    start: str | None = None,
) -> dict:
    """Train one stage from step 0 or from stage_dir/resume (a DCP checkpoint that loads on any number of
    processes); write the final checkpoint, metrics and plot. The same loop serves one process and N
    (torchrun): `ctx` gives each rank its rows of every global batch, `cfg.strategy` shards (fsdp) or replicates
    (ddp) the student, `cfg.teacher_strategy` shards (fsdp) or replicates the teacher (auto: sharded only when the
    memory plan needs it), only rank 0 writes files and draws the progress bar. From `cfg` the loop also reads
    the device (without `ctx`), progress, ckpt_every (seconds) and stop_after (raise Interrupted after that many
    optimizer steps of this call; a checkpoint is written first).

    start: where the student came from (recorded in spec.json; a resume from elsewhere is refused)."""
    cfg = cfg or DistillConfig()
    ctx = ctx or DistContext(device=resolve_device(cfg.device))
    progress, ckpt_every_s, stop_after = cfg.progress, cfg.ckpt_every, cfg.stop_after
    sdir, main = StageDir(stage_dir, spec.stage), ctx.is_main
    if main:
        sdir.prepare()
    ctx.barrier()
    record = stage_record(spec, start)
    check_spec(record, sdir, ctx)
    if main:
        sdir.write_spec(record)
    run = setup_stage(spec, student, teacher, data, ctx, cfg)
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
