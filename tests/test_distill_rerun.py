"""Re-running into an existing --out through the real CLI: a finished stage says it is done, a half-finished one
says where it resumes, and another teacher / data / init / budget / stage setting is refused in one line naming
the field, leaving the run directory as it was."""

import json

import pytest
import torch
from cli_checks import one_line_error
from click.testing import CliRunner
from conftest import tiny_corpus, write_tiny_teacher

from llamba.distill.cli import distill
from llamba.distill.config import DistillConfig
from llamba.distill.run import distill_stage
from llamba.distill.stages import STAGES
from llamba.distill.train import Interrupted


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rerun")
    teacher = write_tiny_teacher(root / "teacher")
    other = write_tiny_teacher(root / "teacher3", layers=3)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus()))
    corpus2 = root / "corpus2.jsonl"
    corpus2.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus(seed=1)))
    return root, teacher, other, corpus, corpus2


def _invoke(args):
    return CliRunner().invoke(distill, args, catch_exceptions=False)


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _base(teacher, corpus, out, *extra):
    return [
        "stage1",
        "--teacher",
        str(teacher),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--tokens",
        "256",
        "--seq-len",
        "32",
        "--no-progress",
        *extra,
    ]


def test_finished_stage_rerun_says_done_and_refuses_other_settings(files):
    root, teacher, other, corpus, corpus2 = files
    out = root / "done"
    first = _invoke(_base(teacher, corpus, out))
    assert first.exit_code == 0, first.output
    assert "stage 1: 256 tokens" in first.output
    before = _snapshot(out)

    again = _invoke(_base(teacher, corpus, out))
    assert again.exit_code == 0, again.output
    assert "stage 1: already done" in again.output and "tokens, loss" not in again.output

    more = [("512" if a == "256" else a) for a in _base(teacher, corpus, out)]
    one_line_error(_invoke(more), "different `tokens`", "256", "--tokens 256")
    one_line_error(
        _invoke(_base(teacher, corpus, out, "--lr", "0.01")), "different `lr`", f"--lr {STAGES[1].lr}"
    )
    one_line_error(_invoke(_base(other, corpus, out)), "run.json", "--teacher", str(teacher), "new --out")
    one_line_error(_invoke(_base(teacher, corpus2, out)), "run.json", "--data", str(corpus))
    one_line_error(_invoke(_base(teacher, corpus, out, "--init", "attention")), "--init llamba")
    assert _snapshot(out) == before  # every refusal left the run as it was

    corpus_copy = root / "copy.jsonl"  # same path, other content
    corpus_copy.write_bytes(corpus.read_bytes())
    out2 = root / "content"
    assert _invoke(_base(teacher, corpus_copy, out2)).exit_code == 0
    corpus_copy.write_bytes(corpus2.read_bytes())
    one_line_error(_invoke(_base(teacher, corpus_copy, out2)), "content of --data", "changed")


def test_grouped_bc_heads_build_a_grouped_student_and_are_part_of_the_run(files):
    """--qk-heads 2 (the tiny teacher's KV heads): a student with 2 B/C groups that trains; a re-run without the
    flag is refused naming it; a count that does not divide the teacher's 4 heads is a one-line error."""
    from llamba.checkpoints import load_model

    root, teacher, other, corpus, corpus2 = files
    out = root / "grouped"
    res = _invoke(_base(teacher, corpus, out, "--qk-heads", "2"))
    assert res.exit_code == 0, res.output
    student = load_model(out / "stage1")
    assert student.config.n_qk_heads == 2 and student.config.n_v_heads == 4
    assert json.loads((out / "init" / "init.json").read_text())["qk_heads"] == 2
    before = _snapshot(out)
    one_line_error(_invoke(_base(teacher, corpus, out)), "--qk-heads 2 (now 4)", "pass --qk-heads 2")
    one_line_error(
        _invoke(_base(teacher, corpus, root / "bad", "--qk-heads", "3")),
        "--qk-heads 3 must divide",
        "4 attention heads",
        "its 2 KV heads",
    )
    one_line_error(
        _invoke(_base(teacher, corpus, root / "bad2", "--qk-heads", "2", "--init", "attention")),
        "--init attention needs n_v_heads = n_qk_heads = 4",
    )
    assert _snapshot(out) == before
    # a run dir begun before run.json recorded qk_heads: the saved init student is what counts
    run_json = out / "run.json"
    rec = json.loads(run_json.read_text())
    del rec["qk_heads"]
    run_json.write_text(json.dumps(rec))
    for k in (1,):
        (out / f"stage{k}" / "DONE.json").unlink()
    one_line_error(_invoke(_base(teacher, corpus, out)), "2 B/C heads (now --qk-heads 4)", "--qk-heads 2")


def test_half_finished_stage_says_where_it_resumes_and_refuses_another_teacher(files):
    root, teacher, other, corpus, corpus2 = files
    out = root / "half"
    kw = dict(
        teacher=str(teacher),
        data=str(corpus),
        out=out,
        tokens=6 * 4 * 32,
        seq_len=32,
        device="cpu",
        no_progress=True,
        ckpt_every=1e9,
    )
    with pytest.raises(Interrupted):
        distill_stage(1, DistillConfig.of(stop_after=2, **kw))
    assert (out / "stage1" / "resume").is_dir()
    before = _snapshot(out)
    args = [
        "stage1",
        "--teacher",
        str(teacher),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--tokens",
        "768",
        "--seq-len",
        "32",
        "--no-progress",
    ]
    one_line_error(_invoke([*args[:2], str(other), *args[3:]]), "--teacher")
    one_line_error(_invoke([*args[:4], str(corpus2), *args[5:]]), "--data")
    assert _snapshot(out) == before
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    assert "stage 1: resuming at step 2/6 from resume/, 256 tokens done" in result.output
    rows = [json.loads(x) for x in (out / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))


def test_finished_all_rerun_with_another_budget_is_refused(files):
    root, teacher, other, corpus, corpus2 = files
    out = root / "all"
    args = [
        "all",
        "--teacher",
        str(teacher),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--tokens",
        "2000",
        "--seq-len",
        "32",
        "--no-progress",
        "--eval-tokens",
        "128",
    ]
    assert _invoke(args).exit_code == 0
    again = _invoke(args)
    assert again.exit_code == 0, again.output
    assert "already finished" in again.output and "(finished before)" in again.output
    one_line_error(_invoke([*args[:8], "3000", *args[9:]]), "--tokens 2000")


def test_non_finite_loss_stops_keeps_the_last_good_checkpoint_and_exits_nonzero(files):
    root, teacher, other, corpus, corpus2 = files
    out = root / "nan"
    args = [
        "stage1",
        "--teacher",
        str(teacher),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--tokens",
        "1280",
        "--seq-len",
        "32",
        "--no-progress",
        "--lr",
        "1e6",
        "--ckpt-every",
        "0",
    ]
    line = one_line_error(
        _invoke(args), "stage 1: loss nan", "stopped without applying it", "last good checkpoint", "--lr"
    )
    stage = out / "stage1"
    assert not (stage / "DONE.json").exists() and not (stage / "model.safetensors").exists()
    assert (stage / "resume").is_dir()
    step = int(line.split("resume at step ")[1].split()[0])
    rows = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    assert (
        rows and all(r["loss"] == r["loss"] for r in rows) and rows[-1]["step"] == step
    )  # no nan row logged

    for lr in ("nan", "inf"):  # (negative values are refused by click itself)
        one_line_error(_invoke([*args[:-4], "--lr", lr]), "--lr")


def test_corrupt_teacher_payload_stops_at_the_first_step(files):
    from safetensors.torch import load_file, save_file

    root, teacher, other, corpus, corpus2 = files
    bad = write_tiny_teacher(root / "nan-teacher")
    weights = load_file(bad / "model.safetensors")
    name = next(k for k in weights if "q_proj" in k)
    weights[name] = torch.full_like(weights[name], float("nan"))  # header intact, payload corrupt
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    out = root / "nan-teacher-run"
    one_line_error(
        _invoke(_base(bad, corpus, out)), "loss nan", "step 1/", "no checkpoint", "teacher's weights"
    )
    assert not (out / "stage1" / "DONE.json").exists()


def test_damaged_state_files_are_named_with_the_fix_and_stale_temporaries_go(files):
    from llamba.distill.cli import eval_cmd

    root, teacher, other, corpus, corpus2 = files
    out = root / "state"
    kw = dict(
        teacher=str(teacher),
        data=str(corpus),
        out=out,
        tokens=6 * 4 * 32,
        seq_len=32,
        device="cpu",
        no_progress=True,
        ckpt_every=1e9,
    )
    with pytest.raises(Interrupted):
        distill_stage(1, DistillConfig.of(stop_after=2, **kw))
    stage = out / "stage1"
    args = [
        "stage1",
        "--teacher",
        str(teacher),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--tokens",
        "768",
        "--seq-len",
        "32",
        "--no-progress",
    ]

    spec = (stage / "spec.json").read_bytes()
    (stage / "spec.json").write_text("")
    one_line_error(_invoke(args), "spec.json is empty", "delete it")
    (stage / "spec.json").write_bytes(spec)
    run = (out / "run.json").read_bytes()
    (out / "run.json").write_text('{"teacher": ')
    one_line_error(_invoke(args), "run.json is corrupt")
    (out / "run.json").write_bytes(run)
    shard = next((stage / "resume").glob("*.distcp"))
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 3])
    one_line_error(_invoke(args), "resume cannot be read", "delete it")
    shard.write_bytes(good)

    with open(stage / "metrics.jsonl", "a") as f:  # a kill mid-append tears the last line
        f.write('{"step": 3, "tokens": 38')
    (stage / ".save-stale").mkdir()
    (stage / ".save-stale" / "model.safetensors").write_bytes(b"half")
    (stage / ".spec.json.x1y2.tmp").write_text("{")
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    assert not (stage / ".save-stale").exists() and not (stage / ".spec.json.x1y2.tmp").exists()
    assert [json.loads(x)["step"] for x in (stage / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, 7)
    )

    done = (stage / "DONE.json").read_bytes()
    (stage / "DONE.json").write_text("")
    one_line_error(_invoke(args), "DONE.json is empty", "delete it to train this stage again")
    (stage / "DONE.json").unlink()  # weights written, DONE.json not: eval warns
    ev = [
        "--model",
        str(stage),
        "--teacher",
        str(teacher),
        "--data",
        str(corpus),
        "--seq-len",
        "32",
        "--max-tokens",
        "64",
        "--json",
    ]
    result = CliRunner().invoke(eval_cmd, ev, catch_exceptions=False)
    assert result.exit_code == 0 and "has no DONE.json" in result.output, result.output
    (stage / "DONE.json").write_bytes(done)
    result = CliRunner().invoke(eval_cmd, ev, catch_exceptions=False)
    assert result.exit_code == 0 and "warning" not in result.output, result.output


def test_each_command_offers_only_the_options_it_uses():
    from llamba.distill.options import cli_fields
    from llamba.distill.stages import StageSpec, default_spec

    helps = {
        name: CliRunner().invoke(distill, [name, "--help"]).output
        for name in ("stage1", "stage2", "stage3", "all")
    }
    assert "--temperature" not in helps["stage1"] and "--mixer-only" not in helps["stage1"]
    assert "--mixer-only" in helps["stage2"] and "--temperature" not in helps["stage2"]
    assert "--temperature" in helps["stage3"] and "--freeze-mlp" in helps["stage3"]
    assert all(f"--{o}" in helps["all"] for o in ("temperature", "mixer-only", "eval-tokens"))
    for record in STAGES.values():  # a stage option's default is the StageSpec default (one place), or None
        for f in cli_fields(record.options):  # for a default the stage record sets (epochs)
            expected = getattr(StageSpec(record.number, 10**6), f.name)
            assert (
                f.default is None
                and getattr(default_spec(record.number, 10**6), f.name) == getattr(record, f.name)
                or f.default == expected
            )


def test_a_budget_below_half_a_step_and_eval_against_another_teacher_are_refused(files):
    from llamba.distill.cli import eval_cmd

    root, teacher, other, corpus, corpus2 = files
    out = root / "tiny-budget"
    one_line_error(
        _invoke(
            [
                "stage1",
                "--teacher",
                str(teacher),
                "--data",
                str(corpus),
                "--out",
                str(out),
                "--tokens",
                "16",
                "--seq-len",
                "16",
                "--batch-size",
                "32",
                "--no-progress",
            ]
        ),
        "budget of 16 tokens",
        "--batch-size",
    )
    assert not out.exists()
    done = root / "done" / "stage1"  # the first test's run when it ran; else make one
    if not (done / "DONE.json").is_file():
        assert _invoke(_base(teacher, corpus, root / "done")).exit_code == 0
    result = CliRunner().invoke(
        eval_cmd,
        [
            "--model",
            str(done),
            "--teacher",
            str(other),
            "--data",
            str(corpus),
            "--seq-len",
            "32",
            "--max-tokens",
            "64",
        ],
        catch_exceptions=False,
    )
    one_line_error(result, "2 layers", "teacher has 3")


def test_stage1_memory_plan_counts_its_attention_maps(files):
    from conftest import tiny_teacher

    from llamba.distill.distributed import DistContext, memory_plan
    from llamba.distill.init import build_student
    from llamba.distill.stages import STAGES, default_spec

    root, teacher, other, corpus, corpus2 = files
    t = tiny_teacher()
    spec = default_spec(1, 10**6, seq_len=512, batch_size=4)
    extra = STAGES[1].extra_bytes(spec, t.config)
    assert extra == 4 * 4 * 4 * t.config.num_attention_heads * 512**2  # 4 fp32 (b, heads, l, l) tensors
    assert STAGES[2].extra_bytes(spec, t.config) == 0
    plan = memory_plan(build_student(t), t, DistContext(), (4, 512), stage_bytes=extra)
    assert plan["stage extra"] == extra / 2**30 and plan["total"] >= plan["stage extra"]
    out = root / "huge"  # 100k x 100k maps: refused at once, before any data is read
    one_line_error(
        _invoke(
            [
                "stage1",
                "--teacher",
                str(teacher),
                "--data",
                str(corpus),
                "--out",
                str(out),
                "--tokens",
                "1000000",
                "--seq-len",
                "100000",
                "--no-progress",
            ]
        ),
        "attention maps",
        "--seq-len",
    )
    assert not (out / "stage1").exists()
