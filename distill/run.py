"""The pipeline: init -> stage 1 -> 2 -> 3 -> held-out evaluation (`distill_all`), or one stage (`distill_stage`),
each read from one `DistillConfig` (distill/config.py). The loop that trains a stage is distill/train.py.

Kill the process (any rank of a torchrun job) at any moment and re-run the same command: finished stages are
skipped and a running stage continues from its last resume/ (train.py), so the result equals an uninterrupted run.
A re-run with another teacher, data, init or stage setting is refused, naming the field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from llamba.atomic import clean_stale
from llamba.card import CARD_METRICS
from llamba.checkpoints import load_model, record_distillation
from llamba.distill.config import DEFAULT_TOTAL_TOKENS, DistillConfig
from llamba.distill.data import build_token_data, load_documents
from llamba.distill.distributed import DistContext, available_memory_gib, bf16_supported
from llamba.distill.init import build_student
from llamba.distill.rundir import RunDir, RunError, StageDir, data_name, read_json, run_identity, write_json
from llamba.distill.stages import STAGES, StageSpec, split_budget
from llamba.distill.stream import TokenStream, open_source
from llamba.distill.teacher import Teacher, get_teacher
from llamba.distill.teacher_cache import epoch_pool
from llamba.distill.train import check_spec, say, stage_record, train_stage
from llamba.errors import ResourceError
from llamba.model import LlambaForCausalLM

CARD_KEYS = {key for key, _, _ in CARD_METRICS}


# --------------------------------------------------------------------------------------------------
# Stages and the whole pipeline
# --------------------------------------------------------------------------------------------------
def start_name(stage: int, init_from: str | Path | None) -> str:
    """Where a stage's student comes from, as recorded in spec.json."""
    if init_from is not None:
        return str(Path(init_from).resolve())
    return "init" if stage == min(STAGES) else f"stage{stage - 1}"


def stage_start(cfg: DistillConfig, stage: int, teacher: Teacher, ctx: DistContext) -> LlambaForCausalLM:
    """The student a stage starts from: cfg.init_from, else the previous stage of this run, else (the first stage)
    the initialized student saved under RUN_DIR/init (built once by rank 0 with cfg.init and cfg.seed, so re-runs
    and all ranks start from the same weights)."""
    out, device = Path(cfg.out), ctx.device
    if cfg.init_from is not None:
        return load_model(cfg.init_from, device=device)
    if stage > min(STAGES):
        prev = RunDir(out).stage(stage - 1)
        if prev.done() is None:
            raise RunError(
                f"{prev.done_file}: stage {stage - 1} has not finished in this run; run it first "
                "(or pass --init-from CHECKPOINT)"
            )
        return load_model(prev.path, device=device)
    init_dir = RunDir(out).init_dir
    qk = student_qk_heads(teacher, cfg.qk_heads)
    if ctx.is_main and not (init_dir / "config.json").is_file():
        student = build_student(teacher.model, init=cfg.init, seed=cfg.seed, n_qk_heads=qk)
        StageDir(init_dir).save_weights(student, teacher.tokenizer)
        write_json(init_dir / "init.json", {"init": cfg.init, "seed": cfg.seed, "qk_heads": qk}, indent=None)
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


def _load_teacher(cfg: DistillConfig, ctx: DistContext) -> Teacher:
    return get_teacher(
        cfg.teacher, ctx.device, torch.bfloat16 if bf16_supported(ctx.device) else torch.float32
    )


def _check_run(cfg: DistillConfig, t: Teacher, ctx: DistContext, write: bool = False, **extra) -> RunDir:
    """Refuse a run directory begun with another teacher, data, init (or `all` budget); with `write`, record them
    (once the data has loaded, so a command that failed on bad input does not claim the directory)."""
    rd = RunDir(Path(cfg.out))
    if write and ctx.is_main:
        rd.root.mkdir(parents=True, exist_ok=True)
        clean_stale(rd.root)  # temporaries of writers killed in an earlier run (stage dirs: train_stage)
        clean_stale(rd.init_dir)
    identity = run_identity(t, cfg.data, cfg.text_field, cfg.init)
    rd.check_identity(
        {**identity, "qk_heads": student_qk_heads(t, cfg.qk_heads), **extra}, write=write and ctx.is_main
    )
    ctx.barrier()
    return rd


def _stage_data(cfg: DistillConfig, spec: StageSpec, t: Teacher, docs: list[str] | None):
    """The stage's token source: a stream read lazily, or rows packed in memory (an epoch pool for epochs > 1)."""
    if spec.stream:
        source = open_source(cfg.data, cfg.text_field, t.model, t.tokenizer, docs)
        return TokenStream(source, t.tokenizer, spec.seq_len, spec.stream_shards)
    if docs is None:
        docs = load_documents(cfg.data, cfg.text_field, t.model, t.tokenizer)
    token_data = build_token_data(docs, t.tokenizer, spec.seq_len)
    if spec.epochs > 1:
        token_data = epoch_pool(token_data, spec.tokens, spec.epochs, spec.seed)
    return token_data


def distill_stage(
    stage: int,
    cfg: DistillConfig,
    teacher: Teacher | None = None,
    docs: list[str] | None = None,
    checked: bool = False,
) -> dict:
    """Run (or resume, or skip when finished) one stage in RUN_DIR cfg.out, with a budget of cfg.tokens (default:
    the stage's share of DEFAULT_TOTAL_TOKENS). teacher / docs: already loaded (distill_all passes them; `checked`:
    the run directory's identity too). Under torchrun every rank runs this same call (see distill/distributed.py).
    Returns the stage summary (also in RUN_DIR/stageK/DONE.json), with "already_done": True when the stage had
    finished before this call (same settings; other settings are refused)."""
    ctx = DistContext.from_env(None if cfg.device == "auto" else cfg.device)
    tokens = cfg.tokens if cfg.tokens is not None else split_budget(DEFAULT_TOTAL_TOKENS)[stage]
    spec = cfg.spec(stage, tokens)  # validates the settings before any loading
    if spec.epochs > 1 and spec.stream:
        raise RunError("--epochs > 1 cycles over an in-memory pool of rows; drop --stream or use --epochs 1")
    t = teacher or _load_teacher(cfg, ctx)
    check_stage_memory(spec, t, ctx)
    if not checked:
        _check_run(cfg, t, ctx)
    sdir = RunDir(Path(cfg.out)).stage(stage)
    record = stage_record(spec, start_name(stage, cfg.init_from))
    done = sdir.done()
    if done is not None:
        check_spec(record, sdir, ctx, finished=True)
        say(ctx, f"stage {stage}: already done ({sdir.done_file.name} in {sdir.path}); nothing to train")
        return {**done, "already_done": True}
    token_data = _stage_data(cfg, spec, t, docs)
    if not checked:
        _check_run(cfg, t, ctx, write=True)
    student = stage_start(cfg, stage, t, ctx)
    return train_stage(spec, student, t, token_data, sdir.path, cfg, ctx, start=record.get("start"))


def stage_budgets(cfg: DistillConfig) -> dict[int, int]:
    """cfg.tokens (default DEFAULT_TOTAL_TOKENS) split over the stages by cfg.split; a stage whose share is under
    one optimizer step runs one step (a single stage command refuses such a budget instead: there the user chose
    it). Validates every stage's settings before anything is loaded."""
    budget = split_budget(cfg.tokens or DEFAULT_TOTAL_TOKENS, cfg.split)
    for k in STAGES:
        budget[k] = max(budget[k], cfg.spec(k, 1 << 40).tokens_per_step)
        cfg.spec(k, budget[k])
    return budget


def distill_all(cfg: DistillConfig) -> dict:
    """The main job: init -> every stage of the registry in order -> held-out evaluation, resumable at any point.

    Returns {"init": {...}, "stages": {k: summary}, "eval": evaluate(...) dict, "out": str, "already_done": bool
    (everything had finished before this call)}; the evaluation is also written to RUN_DIR/eval.json."""
    from llamba.distill.evaluate import EvalOptions, evaluate, evaluate_tokens, heldout_rows

    tokens = cfg.tokens or DEFAULT_TOTAL_TOKENS
    ctx = DistContext.from_env(None if cfg.device == "auto" else cfg.device)
    budget = stage_budgets(cfg)
    t = _load_teacher(cfg, ctx)
    rd = _check_run(cfg, t, ctx, tokens=tokens)
    stream = bool(cfg.settings(min(STAGES)).get("stream"))
    docs = None if stream else load_documents(cfg.data, cfg.text_field, t.model, t.tokenizer)
    _check_run(cfg, t, ctx, write=True, tokens=tokens)
    result = {"out": str(cfg.out), "stages": {}}

    # Evaluations run on every rank (a sharded teacher's forward is a collective); rank 0 writes them.
    init_eval = rd.init_dir / "eval.json"
    first = dataclasses.replace(cfg, init_from=None)
    student = stage_start(first, min(STAGES), t, ctx)
    if ctx.broadcast_object(not init_eval.is_file()):
        held = heldout_rows(t, 256, cfg.data, cfg.text_field, docs, stream)
        n = max(1, min(held.shape[0], cfg.eval_tokens // 256))
        ev = evaluate_tokens(student, t.model, held[:n].to(ctx.device), per_layer=False)
        if ctx.is_main:
            write_json(init_eval, ev, indent=None)
    ctx.barrier()
    result["init"] = _read_eval(init_eval)
    del student

    for k in STAGES:
        stage_cfg = dataclasses.replace(first, tokens=budget[k])
        result["stages"][k] = distill_stage(k, stage_cfg, t, docs, checked=True)
    result["already_done"] = (
        all(s.get("already_done") for s in result["stages"].values()) and rd.eval_file.is_file()
    )
    if ctx.broadcast_object(not rd.eval_file.is_file()):
        opts = EvalOptions(
            data=cfg.data,
            text_field=cfg.text_field,
            max_tokens=cfg.eval_tokens,
            device=str(ctx.device),
            stream=stream,
        )
        ev = evaluate(rd.stage(max(STAGES)).path, t, opts, docs=docs)
        if ctx.is_main:
            write_json(rd.eval_file, ev)
            chat = {k: v for k, v in ev.get("chat", {}).items() if k in CARD_KEYS}
            record_distillation(
                rd.stage(max(STAGES)).path,
                teacher=cfg.teacher if isinstance(cfg.teacher, str) else None,
                tokens=tokens,
                ppl_ratio=ev.get("ppl_ratio"),
                data=data_name(cfg.data),
                **chat,
            )
    ctx.barrier()
    result["eval"] = _read_eval(rd.eval_file)
    return result


def _read_eval(path: Path) -> dict:
    return read_json(path, "delete it and re-run to evaluate again")
