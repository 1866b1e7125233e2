import json
import warnings
from dataclasses import replace

import pytest
import torch
from conftest import rel_err, tiny_corpus, tiny_teacher, tiny_tokenizer

from llamba.distill.config import DistillConfig
from llamba.distill.data import build_token_data
from llamba.distill.evaluate import evaluate_tokens
from llamba.distill.init import build_student
from llamba.distill.stages import STAGES, default_spec, trainable_parameters
from llamba.distill.teacher import Teacher
from llamba.distill.train import Interrupted, train_stage

QUIET = DistillConfig(device="cpu", no_progress=True)  # the loop's settings: one process on the CPU, no bar


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)  # tiny models gain nothing from threads; shared CPUs lose a lot
    teacher = Teacher(tiny_teacher(), tiny_tokenizer(), "tiny")
    return teacher, tiny_corpus()


def _run(setup, tmp_path, stage, steps, student=None, **kw):
    teacher, docs = setup
    spec = default_spec(stage, tokens=steps * 4 * 32, seq_len=32, batch_size=4, lr=3e-3, **kw)
    data = build_token_data(docs, teacher.tokenizer, spec.seq_len)
    student = student if student is not None else build_student(teacher.model, seed=0)
    summary = train_stage(spec, student, teacher, data, tmp_path, QUIET)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return student, summary, metrics


def _first_last(metrics, k=3):
    losses = [m["loss"] for m in metrics]
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


@pytest.mark.parametrize("stage,kw", [(1, {}), (2, {}), (2, {"mixer_only": True})])
def test_stage_reduces_its_loss(setup, tmp_path, stage, kw):
    student, summary, metrics = _run(setup, tmp_path, stage, steps=24, **kw)
    first, last = _first_last(metrics)
    assert last < 0.9 * first, (first, last)
    assert summary["steps"] == 24 and len(metrics) == 24
    assert (tmp_path / "DONE.json").is_file() and (tmp_path / "loss.png").is_file()
    assert not (tmp_path / "resume").exists()
    if stage in (1, 2):
        assert len(metrics[-1]["per_layer"]) == 2


@pytest.mark.parametrize("kw", [{}, {"freeze_mlp": True}])
def test_stage3_reduces_kl_to_the_teacher(setup, tmp_path, kw):
    """The KD loss is KL + the teacher's entropy; the KL on held-out rows is what must go down."""
    teacher, docs = setup
    held = build_token_data(docs, teacher.tokenizer, 32).heldout[:8]
    student = build_student(teacher.model, seed=0)
    kl_before = evaluate_tokens(student, teacher.model, held, per_layer=False)["kl"]
    _, _, metrics = _run(setup, tmp_path, 3, steps=24, student=student, **kw)
    kl_after = evaluate_tokens(student, teacher.model, held, per_layer=False)["kl"]
    assert kl_after < 0.8 * kl_before, (kl_before, kl_after)
    first, last = _first_last(metrics)
    assert last < first


@pytest.mark.parametrize("teacher_bf16", [False, True])
def test_stage3_teacher_runs_in_bf16_only_when_asked(setup, teacher_bf16):
    """--teacher-bf16 puts the teacher's forward under the student's bf16 autocast; off, it stays fp32."""
    from llamba.distill.stages import stage3_step

    teacher, docs = setup
    spec = default_spec(3, tokens=128, seq_len=32, batch_size=2, precision="bf16", teacher_bf16=teacher_bf16)
    seen = []
    hook = teacher.model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        ids = build_token_data(docs, teacher.tokenizer, 32).train[:2]
        loss, _ = stage3_step(build_student(teacher.model, seed=0), teacher.model, spec, torch.device("cpu"))(
            ids, 1.0
        )
    finally:
        hook.remove()
    assert seen == [torch.bfloat16 if teacher_bf16 else torch.float32]
    assert loss == loss and loss > 0  # finite


@pytest.mark.parametrize(
    "kw", [{"kd_tokens": "assistant"}, {"kd_tokens": "all", "temperature": 2.0, "hard_weight": 0.5}]
)
def test_stage3_fused_head_equals_the_logits_path(kw):
    """The default stage-3 step (LM heads on the counted positions only, the student's head fused with the loss)
    against the same step through the models' full logits and kd_loss (the path a wrapped student takes): same
    loss and same gradients, fp32, on chat rows with system / user / assistant turns."""
    from conftest import CHAT_VOCAB, tiny_chat_tokenizer

    from llamba.distill.chat_data import ChatMarkers, render
    from llamba.distill.stages import stage3_step

    tok = tiny_chat_tokenizer()
    teacher = tiny_teacher(vocab_size=CHAT_VOCAB)
    conv = render(
        tok,
        [
            {"role": "system", "content": "ba be"},
            {"role": "user", "content": "bi bo bu"},
            {"role": "assistant", "content": "bu ba bi bo be ba"},
        ],
    )
    row = tok(conv, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([row[5:] + row[:5], row])  # one row cut inside a turn, one whole conversation
    spec = default_spec(3, tokens=64, seq_len=ids.shape[1], batch_size=2, precision="fp32", **kw)
    cpu, markers = torch.device("cpu"), ChatMarkers.of(tok)
    grads = []
    for wrapped in (False, True):
        student = build_student(teacher, seed=0)
        net = torch.nn.Module() if wrapped else student
        if wrapped:  # what DDP looks like to the step: a `.module` and a forward
            net.module = student
            net.forward = student.forward
        loss, _ = stage3_step(net, teacher, spec, cpu, markers)(ids, 1.0)
        grads.append((loss, [p.grad.clone() for p in student.parameters() if p.grad is not None]))
    (fused, g_fused), (plain, g_plain) = grads
    assert fused == pytest.approx(plain, rel=1e-5)
    assert len(g_fused) == len(g_plain) > 0
    for a, b in zip(g_fused, g_plain, strict=True):
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-7


def test_fused_adamw_matches_the_foreach_update(setup):
    """make_optimizer picks the fused AdamW kernel for plain tensors: five steps of it and of the foreach AdamW
    (same groups, same gradients) leave the same parameters."""
    from llamba.distill.stages import make_optimizer

    teacher, _ = setup
    spec = default_spec(3, tokens=128, seq_len=32, batch_size=2, lr=1e-2)
    models = [build_student(teacher.model, seed=0) for _ in range(2)]
    opts = [make_optimizer(list(m.named_parameters()), spec) for m in models]
    assert opts[0].defaults["fused"]
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opts[1].param_groups]
    opts[1] = torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=1e-8, foreach=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        for p0, p1 in zip(models[0].parameters(), models[1].parameters(), strict=True):
            p0.grad = torch.randn(p0.shape, generator=g)
            p1.grad = p0.grad.clone()
        for o in opts:
            o.step()
    for p0, p1 in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(p0, p1, rtol=1e-5, atol=1e-6)


def test_stage1_trains_only_mixers_and_input_norms(setup, tmp_path):
    teacher, _ = setup
    before = build_student(teacher.model, seed=0)
    after, _, _ = _run(setup, tmp_path, 1, steps=2, student=build_student(teacher.model, seed=0))
    for (name, p0), p1 in zip(before.named_parameters(), after.parameters(), strict=True):
        if not torch.equal(p0, p1):
            assert ".mixer." in name or ".input_layernorm." in name, name
    assert not torch.equal(
        before.backbone.layers[0].mixer.in_proj.weight, after.backbone.layers[0].mixer.in_proj.weight
    )


def test_freeze_mlp_keeps_mlps(setup, tmp_path):
    teacher, _ = setup
    student, _, _ = _run(setup, tmp_path, 3, steps=2, freeze_mlp=True)
    for t_layer, s_layer in zip(teacher.model.model.layers, student.backbone.layers, strict=True):
        assert torch.equal(t_layer.mlp.up_proj.weight, s_layer.mlp.up_proj.weight)


@pytest.mark.parametrize("stage", [2, 3])
def test_killed_and_resumed_equals_uninterrupted(setup, tmp_path, stage):
    teacher, docs = setup
    spec = default_spec(stage, tokens=6 * 2 * 32, seq_len=32, batch_size=2, lr=3e-3, seed=3)
    data = build_token_data(docs, teacher.tokenizer, spec.seq_len)

    full = build_student(teacher.model, seed=0)
    train_stage(spec, full, teacher, data, tmp_path / "a", QUIET)

    part = build_student(teacher.model, seed=0)
    with pytest.raises(Interrupted):
        train_stage(spec, part, teacher, data, tmp_path / "b", replace(QUIET, ckpt_every=1e9, stop_after=4))
    assert (tmp_path / "b" / "resume").is_dir() and not (tmp_path / "b" / "DONE.json").exists()
    # a kill between the two renames of a checkpoint save leaves only resume.old: it must be picked up
    (tmp_path / "b" / "resume").rename(tmp_path / "b" / "resume.old")
    # a kill after the checkpoint may leave log lines that the checkpoint does not cover: they must go
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "tokens": 0, "loss": 123.0}) + "\n")
    resumed = build_student(
        teacher.model, seed=99
    )  # the weights come from the resume checkpoint, not from here
    train_stage(spec, resumed, teacher, data, tmp_path / "b", QUIET)

    for (name, p), q in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    rows = [
        [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"
    ]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]
    assert [r["step"] for r in rows[1]] == list(range(1, 7))


def test_resume_with_changed_settings_is_refused(setup, tmp_path):
    teacher, docs = setup
    spec = default_spec(2, tokens=4 * 2 * 32, seq_len=32, batch_size=2)
    data = build_token_data(docs, teacher.tokenizer, 32)
    with pytest.raises(Interrupted):
        train_stage(
            spec,
            build_student(teacher.model),
            teacher,
            data,
            tmp_path,
            replace(QUIET, stop_after=1),
        )
    spec.lr = 1.0
    with pytest.raises(ValueError, match="different `lr`"):
        train_stage(spec, build_student(teacher.model), teacher, data, tmp_path, QUIET)


@pytest.mark.parametrize("stage", [1, 3])
def test_activation_checkpointing_and_grad_accumulation_change_nothing(setup, tmp_path, stage):
    """Recomputing each block in backward, and 2 micro-batches of 2 rows instead of one of 4, give the same run."""
    teacher, docs = setup
    runs = {}
    for name, batch, accum, ckpt in (("ref", 4, 1, False), ("ckpt", 4, 1, True), ("accum", 2, 2, False)):
        spec = default_spec(stage, tokens=3 * 4 * 32, seq_len=32, batch_size=batch, grad_accum=accum, lr=1e-3)
        data = build_token_data(docs, teacher.tokenizer, spec.seq_len)
        runs[name] = build_student(teacher.model, seed=0)
        train_stage(
            spec,
            runs[name],
            teacher,
            data,
            tmp_path / name,
            replace(QUIET, activation_checkpointing=ckpt),
        )
    ref = runs["ref"].state_dict()
    ref_losses = [
        json.loads(x)["loss"] for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    ]
    for name in ("ckpt", "accum"):
        losses = [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=0)
        assert runs[name].state_dict().keys() == ref.keys()
        for k, v in runs[name].state_dict().items():
            # as in the 2-process tests: Adam turns summation-order noise of near-zero gradients into O(lr/10)
            torch.testing.assert_close(
                v, ref[k], rtol=1e-3, atol=1e-4, msg=lambda m, k=k, n=name: f"{n} {k}: {m}"
            )


@pytest.mark.parametrize("stage", [2, 3])
def test_compiled_step_equals_eager(setup, stage):
    """--compile: the stage's loss step through torch.compile (inductor) gives the eager step's loss and gradients."""
    teacher, docs = setup
    spec = default_spec(stage, tokens=10**6, seq_len=32, batch_size=2, precision="fp32", epochs=1)
    ids = build_token_data(docs, teacher.tokenizer, 32).train[:2]
    grads, losses = [], []
    for compile in (False, True):
        student = build_student(teacher.model, seed=0).train()
        trainable_parameters(student, spec)
        net = list(student.backbone.layers) if STAGES[stage].per_block else student
        step = STAGES[stage].step(net, teacher.model, spec, torch.device("cpu"), None, compile)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="torch.compile of")  # compiled, not fallen back
            losses.append(step(ids, 1.0)[0])
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert grads[1].keys() == grads[0].keys() and grads[0]
    for name, g in grads[0].items():
        assert rel_err(grads[1][name], g) < 1e-4, name


def test_compile_failure_runs_the_step_eagerly(setup, monkeypatch):
    teacher, docs = setup

    def broken(fn, **options):
        def fail(*args, **kwargs):
            raise RuntimeError("InductorError: no working C++ compiler")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    spec = default_spec(3, tokens=10**6, seq_len=32, batch_size=2, precision="fp32")
    ids = build_token_data(docs, teacher.tokenizer, 32).train[:2]
    losses = []
    for compile in (False, True):
        student = build_student(teacher.model, seed=0).train()
        step = STAGES[3].step(student, teacher.model, spec, torch.device("cpu"), None, compile)
        if compile:
            with pytest.warns(
                UserWarning, match="torch.compile of the student's forward failed.*C.. compiler"
            ):
                losses.append(step(ids, 1.0)[0])
        else:
            losses.append(step(ids, 1.0)[0])
    assert losses[0] == losses[1]
