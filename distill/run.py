"""Run directories, the training loop shared by the stages, atomic checkpoints and resume.

    RUN_DIR/init/             the initialized student (HF layout) and its held-out perplexity (eval.json)
    RUN_DIR/stageK/           config.json + model.safetensors (LlambaForCausalLM.from_pretrained loads it),
                              metrics.jsonl, loss.png, spec.json (the stage's settings), DONE.json when finished,
                              resume/ while the stage runs (a DCP checkpoint: student + optimizer + step + data
                              position; replaced atomically)

Kill the process (any rank of a torchrun job) at any moment and re-run the same command: finished stages are
skipped and a running stage continues from its last resume/, reading the same batches it would have read
(in-memory batches are a function of the step; a stream restores its saved position), so the result equals an
uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llamba.checkpoints import load_model
from llamba.distill.data import TokenData, build_token_data, load_documents
from llamba.distill.distributed import (
    DistContext,
    bf16_supported,
    check_memory_plan,
    ddp_blocks,
    full_state_dict,
    load_sharded,
    memory_plan,
    recover_checkpoint,
    resolve_strategy,
    resolve_teacher_strategy,
    save_sharded,
    unwrap,
    wrap_student,
    wrap_teacher,
)
from llamba.distill.init import build_student
from llamba.distill.plots import plot_stage
from llamba.distill.schedule import wsd_lr
from llamba.distill.stages import (
    STAGE_STEPS,
    StageSpec,
    default_spec,
    make_optimizer,
    split_budget,
    trainable_parameters,
)
from llamba.distill.stream import TokenStream, open_source
from llamba.distill.teacher import load_teacher
from llamba.distill.teacher_cache import epoch_pool
from llamba.model import LlambaBlock, LlambaForCausalLM

DEFAULT_TOTAL_TOKENS = 24_000  # BENCHMARKS.md, "Distillation quality vs compute": the largest budget measured end to end


class RunError(ValueError):
    """Bad run directory, checkpoint or settings; the one-line message names the file and field."""


class Interrupted(RuntimeError):
    """Raised by `stop_after` (tests simulate a kill with it, right after a checkpoint)."""


@dataclass
class Teacher:
    model: torch.nn.Module
    tokenizer: object
    spec: str


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def get_teacher(teacher, device: torch.device, dtype: torch.dtype = torch.float32) -> Teacher:
    if isinstance(teacher, Teacher):
        return teacher
    if isinstance(teacher, tuple):
        return Teacher(teacher[0].to(device), teacher[1], "given")
    model, tokenizer = load_teacher(teacher, dtype)
    return Teacher(model.to(device), tokenizer, str(teacher))


# --------------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600 files
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_student(student: LlambaForCausalLM, dest: Path, tokenizer=None) -> None:
    """save_pretrained (and the teacher's tokenizer, so the checkpoint is self-contained) into a temporary folder
    inside dest, then move each file into dest with os.replace, config.json last."""
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".save-"))
    try:
        student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):  # config last
            os.replace(f, dest / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------------
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


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _consolidated_student(model: torch.nn.Module, student: LlambaForCausalLM, ctx: DistContext):
    """A plain LlambaForCausalLM with the full weights on rank 0 (gathered from the shards when sharded; every
    rank must call this), None on the other ranks."""
    if model is student and not hasattr(student, "unshard"):  # neither FSDP nor DDP: already plain
        return student
    state = full_state_dict(model)  # collective; only rank 0 receives the tensors
    if not ctx.is_main:
        return None
    plain = LlambaForCausalLM(student.config)
    plain.load_state_dict(state)
    return plain


def _check_spec(spec: StageSpec, spec_file: Path, resuming: bool, ctx: DistContext) -> None:
    """Refuse to resume with other settings (fields missing from an older spec.json read as their defaults), and
    make sure every rank runs rank 0's settings (so all agree on the token budget and the steps)."""
    new = spec.to_json()
    if spec_file.is_file() and resuming:
        old = {**StageSpec(spec.stage, spec.tokens).to_json(), **json.loads(spec_file.read_text())}
        diff = [k for k, v in new.items() if old.get(k) != v]
        if diff:
            raise RunError(
                f"{spec_file}: this stage was started with a different `{diff[0]}` "
                f"({old.get(diff[0])!r} vs {new[diff[0]]!r}); use another --out or delete it"
            )
    first = ctx.broadcast_object(new)
    diff = [k for k, v in new.items() if first.get(k) != v]
    if diff:
        raise RunError(f"rank {ctx.rank}: `{diff[0]}` is {new[diff[0]]!r} here but {first[diff[0]]!r} on rank 0; "
                       "launch every rank with the same command")


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
) -> dict:
    """Train one stage from step 0 or from stage_dir/resume (a DCP checkpoint that loads on any number of
    processes); write the final checkpoint, metrics and plot. The same loop serves one process and N
    (torchrun): `ctx` gives each rank its rows of every global batch, `strategy` shards (fsdp) or replicates (ddp)
    the student, `teacher_strategy` shards (fsdp) or replicates the teacher (auto: sharded only when the memory
    plan needs it), only rank 0 writes files and draws the progress bar.

    stop_after: raise Interrupted after that many optimizer steps of this call (a checkpoint is written first)."""
    ctx = ctx or DistContext(device=device)
    main = ctx.is_main
    stage_dir.mkdir(parents=True, exist_ok=True)
    spec_file, resume_dir, metrics_file = stage_dir / "spec.json", stage_dir / "resume", stage_dir / "metrics.jsonl"
    recover_checkpoint(resume_dir, ctx)
    resuming = resume_dir.is_dir()
    _check_spec(spec, spec_file, resuming, ctx)
    if main:
        atomic_write_text(spec_file, json.dumps(spec.to_json(), indent=1))

    student.to(device).train()
    trainable_parameters(student, spec)
    strategy = resolve_strategy(strategy, ctx)
    sharded_teacher = hasattr(teacher.model, "unshard")  # sharded by an earlier stage of this run
    plan_args = (student, teacher.model, ctx, strategy, spec.seq_len, spec.batch_size // ctx.world_size,
                 activation_checkpointing)
    teacher_strategy = "fsdp" if sharded_teacher else ctx.broadcast_object(  # rank 0's free memory decides
        resolve_teacher_strategy(teacher_strategy, ctx, memory_plan(*plan_args, teacher_strategy="replicate")))
    plan_line = check_memory_plan(memory_plan(*plan_args, teacher_strategy=teacher_strategy), ctx)
    if not sharded_teacher:
        wrap_teacher(teacher.model, ctx, teacher_strategy)
    model = wrap_student(student, ctx, strategy, LlambaBlock, activation_checkpointing,
                         mixed_precision=spec.precision != "fp32", ddp_per_block=spec.stage < 3)
    named = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = make_optimizer(named, spec)
    step, elapsed, metrics = 0, 0.0, []
    if resuming:
        extra = load_sharded(resume_dir, model, opt, {"step": 0, "elapsed": 0.0, "metric_lines": 0, "data": ""})
        step, elapsed = int(extra["step"]), float(extra["elapsed"])
        metrics = _read_metrics(metrics_file)[: int(extra["metric_lines"])]
        data.restore(extra["data"])
    if main:
        atomic_write_text(metrics_file, "".join(json.dumps(m) + "\n" for m in metrics))
    ctx.barrier()

    def checkpoint():
        save_sharded(resume_dir, model, opt, ctx, {"step": step, "elapsed": elapsed, "metric_lines": len(metrics),
                                                   "data": data.position(ctx)})
        if main and metrics:
            plot_stage(metrics, stage_dir / "loss.png", f"stage {spec.stage}")

    # Stages 1-2 call the student's blocks one by one (FSDP2 gathers each block's shards in its own hooks; DDP
    # wraps each block); stage 3 calls the whole model, through the DDP wrapper when there is one.
    if spec.stage == 3:
        net = model
    else:
        net = ddp_blocks(student.backbone.layers, ctx) if strategy == "ddp" else list(student.backbone.layers)
    loss_step = STAGE_STEPS[spec.stage](net, teacher.model, spec, device)
    total = spec.total_steps
    last_ckpt, done_here = time.time(), 0
    with _progress(progress and main) as bar, open(metrics_file, "a", encoding="utf-8") as log:
        if progress and main:
            bar.console.print(f"stage {spec.stage}: {ctx.world_size} process(es), strategy {strategy}, teacher "
                              f"{teacher_strategy}; memory plan: {plan_line}")
        task = bar.add_task(f"stage {spec.stage}", total=total, completed=step, loss=float("nan"), tok_s=0.0)
        while step < total:
            t0 = time.time()
            lr = wsd_lr(step, total, spec.lr, spec.warmup, spec.decay)
            for group in opt.param_groups:
                group["lr"] = lr
            losses, per_layer = [], None
            for micro in range(spec.grad_accum):
                # this rank's rows (b / N, l) of global batch `index`
                ids = data.local_batch(step * spec.grad_accum + micro, spec.batch_size, spec.seed, ctx)
                loss, layers = loss_step(ids.to(device), 1.0 / spec.grad_accum)
                losses.append(loss)
                if layers is not None:
                    per_layer = (
                        layers
                        if per_layer is None
                        else [a + b for a, b in zip(per_layer, layers, strict=True)]
                    )
            grad_norm = torch.nn.utils.clip_grad_norm_(params, spec.clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.time() - t0
            elapsed += dt
            row = {
                "step": step,
                "tokens": step * spec.tokens_per_step,
                "loss": ctx.all_reduce_mean(sum(losses) / len(losses)),
                "lr": lr,
                "grad_norm": grad_norm,
                "tok_s": spec.tokens_per_step / dt,
                "elapsed_s": round(elapsed, 3),
            }
            if per_layer is not None:
                row["per_layer"] = [ctx.all_reduce_mean(x / spec.grad_accum) for x in per_layer]
            metrics.append(row)
            if main:
                log.write(json.dumps(row) + "\n")
                log.flush()
            bar.update(task, completed=step, loss=row["loss"], tok_s=row["tok_s"])
            done_here += 1
            stop = stop_after is not None and done_here >= stop_after
            due = ctx.broadcast_object(time.time() - last_ckpt >= ckpt_every_s)  # all ranks checkpoint together
            if step < total and (stop or due):
                checkpoint()
                last_ckpt = time.time()
            if stop and step < total:
                raise Interrupted(f"stopped after {done_here} steps (step {step}/{total})")

    final = _consolidated_student(model, student, ctx)
    tail = metrics[-max(1, len(metrics) // 10) :]
    summary = {
        "stage": spec.stage,
        "steps": total,
        "tokens": total * spec.tokens_per_step,
        "final_loss": sum(m["loss"] for m in tail) / len(tail),
        "elapsed_s": round(elapsed, 1),
        "tok_s": round(total * spec.tokens_per_step / max(elapsed, 1e-9), 1),
        "world_size": ctx.world_size,
        "strategy": strategy,
        "teacher_strategy": teacher_strategy,
    }
    if tail and "per_layer" in tail[-1]:
        summary["per_layer"] = [
            sum(m["per_layer"][i] for m in tail) / len(tail) for i in range(len(tail[-1]["per_layer"]))
        ]
    if main:
        final.eval()
        save_student(final, stage_dir, teacher.tokenizer)
        plot_stage(metrics, stage_dir / "loss.png", f"stage {spec.stage}")
        atomic_write_text(stage_dir / "DONE.json", json.dumps(summary, indent=1))
        shutil.rmtree(resume_dir, ignore_errors=True)
    ctx.barrier()
    return summary


# --------------------------------------------------------------------------------------------------
# Stages and the whole pipeline
# --------------------------------------------------------------------------------------------------
def stage_start(
    out: Path,
    stage: int,
    teacher: Teacher,
    init: str,
    init_from: str | Path | None,
    seed: int,
    device: torch.device,
    ctx: DistContext | None = None,
) -> LlambaForCausalLM:
    """The student a stage starts from: --init-from, else the previous stage of this run, else (stage 1) the
    initialized student saved under RUN_DIR/init (built once by rank 0, so re-runs and all ranks start from the
    same weights)."""
    ctx = ctx or DistContext(device=device)
    if init_from is not None:
        return load_model(init_from, device=device)
    if stage > 1:
        prev = out / f"stage{stage - 1}"
        if not (prev / "DONE.json").is_file():
            raise RunError(
                f"{prev}/DONE.json: stage {stage - 1} has not finished in this run; run it first "
                "(or pass --init-from CHECKPOINT)"
            )
        return load_model(prev, device=device)
    init_dir = out / "init"
    if ctx.is_main and not (init_dir / "config.json").is_file():
        student = build_student(teacher.model, init=init, seed=seed)
        save_student(student, init_dir, teacher.tokenizer)
        atomic_write_text(init_dir / "init.json", json.dumps({"init": init, "seed": seed}))
    ctx.barrier()
    return load_model(init_dir, device=device)


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
    **spec_overrides,
) -> dict:
    """Run (or resume, or skip when finished) stage 1, 2 or 3 in RUN_DIR `out`. spec_overrides: any StageSpec
    field (seq_len, batch_size, grad_accum, lr, seed, precision, temperature, hard_weight, freeze_mlp,
    mixer_only, stream, stream_shards, ...). Under torchrun every rank runs this same call (see
    distill/distributed.py). Returns the stage summary (also in RUN_DIR/stageK/DONE.json)."""
    out = Path(out)
    stage_dir = out / f"stage{stage}"
    if (stage_dir / "DONE.json").is_file():
        return json.loads((stage_dir / "DONE.json").read_text())
    ctx = DistContext.from_env(None if device == "auto" else device)
    dev = ctx.device
    t = get_teacher(teacher, dev, torch.bfloat16 if bf16_supported(dev) else torch.float32)
    tokens = tokens if tokens is not None else split_budget(DEFAULT_TOTAL_TOKENS)[stage]
    spec = default_spec(stage, tokens, **spec_overrides)
    if spec.epochs > 1 and spec.stream:
        raise RunError("--epochs > 1 cycles over an in-memory pool of rows; drop --stream or use --epochs 1")
    if spec.stream:
        source = open_source(data, text_field, t.model, t.tokenizer, docs)
        token_data = TokenStream(source, t.tokenizer, spec.seq_len, spec.stream_shards)
    else:
        if docs is None:
            docs = load_documents(data, text_field, t.model, t.tokenizer)
        token_data = build_token_data(docs, t.tokenizer, spec.seq_len)
        if spec.epochs > 1:
            token_data = epoch_pool(token_data, spec.tokens, spec.epochs, spec.seed)
    student = stage_start(out, stage, t, init, init_from, spec.seed, dev, ctx)
    return train_stage(spec, student, t, token_data, stage_dir, dev, progress, ckpt_every_s, stop_after, ctx,
                       strategy, activation_checkpointing, teacher_strategy)


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
    **spec_overrides,
) -> dict:
    """The main job: init -> stage 1 -> stage 2 -> stage 3 -> held-out evaluation, resumable at any point.

    tokens: total budget, split over the stages by `split` (default stages.TOKEN_SHARE); spec_overrides apply to every stage and
    stage_overrides = {k: {...}} to stage k only. Returns {"init": {...}, "stages": {k: summary},
    "eval": evaluate(...) dict, "out": str}; the evaluation is also written to RUN_DIR/eval.json."""
    from llamba.distill.evaluate import evaluate, evaluate_tokens, heldout_rows

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = DistContext.from_env(None if device == "auto" else device)
    dev = ctx.device
    t = get_teacher(teacher, dev, torch.bfloat16 if bf16_supported(dev) else torch.float32)
    stream = bool(spec_overrides.get("stream"))
    docs = None if stream else load_documents(data, text_field, t.model, t.tokenizer)
    budget = split_budget(tokens, split)
    seed = spec_overrides.get("seed") or 0
    result = {"out": str(out), "stages": {}}

    # Evaluations run on every rank (a sharded teacher's forward is a collective); rank 0 writes them.
    init_eval = out / "init" / "eval.json"
    student = stage_start(out, 1, t, init, None, seed, dev, ctx)
    if ctx.broadcast_object(not init_eval.is_file()):
        held = heldout_rows(t, 256, data, text_field, docs, stream)
        n = max(1, min(held.shape[0], eval_tokens // 256))
        ev = evaluate_tokens(student, t.model, held[:n].to(dev), per_layer=False)
        if ctx.is_main:
            atomic_write_text(init_eval, json.dumps(ev))
    ctx.barrier()
    result["init"] = json.loads(init_eval.read_text())
    del student

    for k in (1, 2, 3):
        overrides = {**spec_overrides, **((stage_overrides or {}).get(k, {}))}
        result["stages"][k] = distill_stage(
            k,
            t,
            out,
            tokens=budget[k],
            init=init,
            device=device,
            progress=progress,
            ckpt_every_s=ckpt_every_s,
            docs=docs,
            strategy=strategy,
            activation_checkpointing=activation_checkpointing,
            teacher_strategy=teacher_strategy,
            **overrides,
        )
    eval_file = out / "eval.json"
    if ctx.broadcast_object(not eval_file.is_file()):
        ev = evaluate(out / "stage3", t, data, docs=docs, max_tokens=eval_tokens, device=str(dev),
                      text_field=text_field, stream=stream)
        if ctx.is_main:
            atomic_write_text(eval_file, json.dumps(ev, indent=1))
    ctx.barrier()
    result["eval"] = json.loads(eval_file.read_text())
    return result
