import json
import time

import pytest
import torch
from cli_checks import one_line_error
from click.testing import CliRunner
from conftest import tiny_corpus, write_tiny_teacher

from llamba.distill.cli import distill, eval_cmd
from llamba.model import LlambaForCausalLM


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.set_num_threads(1)  # tiny models gain nothing from threads; shared CPUs lose a lot
    root = tmp_path_factory.mktemp("cli")
    teacher = write_tiny_teacher(root / "teacher")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus()))
    return root, teacher, corpus


def _invoke(cmd, args):
    return CliRunner().invoke(cmd, args, catch_exceptions=False)


def test_cli_runs_all_three_stages_end_to_end(files):
    root, teacher, corpus = files
    out = root / "run"
    start = time.time()
    args = [
        "all",
        "--teacher",
        str(teacher),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--tokens",
        "12000",
        "--seq-len",
        "32",
        "--lr",
        "3e-3",
        "--no-progress",
        "--eval-tokens",
        "256",
    ]
    result = _invoke(distill, args)
    assert result.exit_code == 0, result.output
    assert time.time() - start < 60
    assert "teacher ppl" in result.output and "after init" in result.output
    for k in (1, 2, 3):
        stage = out / f"stage{k}"
        for name in (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "metrics.jsonl",
            "loss.png",
            "DONE.json",
        ):
            assert (stage / name).is_file(), (k, name)
        model = LlambaForCausalLM.from_pretrained(stage)
        assert model.config.n_layer == 2
    ev = json.loads((out / "eval.json").read_text())
    assert ev["ppl_ratio"] > 0 and len(ev["layer_rel_err"]) == 2
    # a finished run re-run is a no-op that reprints the results
    again = _invoke(distill, args)
    assert again.exit_code == 0 and "teacher ppl" in again.output

    result = _invoke(
        eval_cmd,
        [
            "--model",
            str(out / "stage3"),
            "--teacher",
            str(teacher),
            "--data",
            str(corpus),
            "--seq-len",
            "32",
            "--max-tokens",
            "128",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert {"teacher_ppl", "student_ppl", "kl", "top1_agreement", "layer_rel_err"} <= set(metrics)


def test_cli_single_stage_with_init_from(files):
    root, teacher, corpus = files
    base = [
        "--teacher",
        str(teacher),
        "--data",
        str(corpus),
        "--tokens",
        "256",
        "--seq-len",
        "32",
        "--no-progress",
    ]
    missing = _invoke(distill, ["stage2", "--out", str(root / "fresh"), *base])
    assert missing.exit_code == 1 and "stage 1 has not finished" in missing.output
    result = _invoke(distill, ["stage1", "--out", str(root / "s"), *base])
    assert result.exit_code == 0, result.output
    result = _invoke(
        distill,
        [
            "stage3",
            "--out",
            str(root / "t"),
            "--init-from",
            str(root / "s" / "stage1"),
            "--freeze-mlp",
            *base,
        ],
    )
    assert result.exit_code == 0, result.output
    assert (root / "t" / "stage3" / "model.safetensors").is_file()


def test_bad_input_gives_one_line_errors(files):
    root, teacher, corpus = files
    from transformers import GPT2Config

    gpt2 = root / "gpt2"
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(gpt2)
    one_line_error(
        _invoke(distill, ["stage1", "--teacher", str(gpt2), "--out", str(root / "x")]), "gpt2", "model_type"
    )
    one_line_error(
        _invoke(
            distill,
            ["stage1", "--teacher", str(teacher), "--data", str(root / "nope.txt"), "--out", str(root / "x")],
        ),
        "nope.txt",
    )
    bad_jsonl = root / "bad.jsonl"
    bad_jsonl.write_text(json.dumps({"body": "x"}) + "\n")
    one_line_error(
        _invoke(
            distill, ["stage1", "--teacher", str(teacher), "--data", str(bad_jsonl), "--out", str(root / "x")]
        ),
        "bad.jsonl",
        "'text'",
    )

    run = root / "run"  # written by the end-to-end test when it ran first; else make a checkpoint here
    if not (run / "stage1" / "config.json").is_file():
        _invoke(
            distill,
            [
                "stage1",
                "--teacher",
                str(teacher),
                "--data",
                str(corpus),
                "--out",
                str(run),
                "--tokens",
                "64",
                "--seq-len",
                "32",
                "--no-progress",
            ],
        )
    ckpt = run / "stage1"
    raw = json.loads((ckpt / "config.json").read_text())

    def with_config(name, cfg):
        d = root / name
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
        return d

    ev = ["--teacher", str(teacher), "--data", str(corpus), "--seq-len", "32", "--max-tokens", "64"]
    no_key = with_config("nokey", {k: v for k, v in raw.items() if k != "d_state"})
    one_line_error(_invoke(eval_cmd, ["--model", str(no_key), *ev]), "config.json", "d_state")
    shape = with_config("shape", {**raw, "intermediate_size": raw["intermediate_size"] * 2})
    one_line_error(_invoke(eval_cmd, ["--model", str(shape), *ev]), "model.safetensors", "mlp")
    dtype = with_config("dtype", {**raw, "dtype": "int8"})
    one_line_error(_invoke(eval_cmd, ["--model", str(dtype), *ev]), "config.json", "dtype")
    unknown = with_config("unknown", {**raw, "my_extra_key": 1})
    with pytest.warns(UserWarning, match="my_extra_key"):
        result = _invoke(eval_cmd, ["--model", str(unknown), *ev])
    assert result.exit_code == 0, result.output


def test_cli_streams_all_three_stages_and_evaluates_on_the_stream_heldout(files):
    root, teacher, corpus = files
    out = root / "streamed"
    args = [
        "all",
        "--teacher",
        str(teacher),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--tokens",
        "3000",
        "--seq-len",
        "32",
        "--stream",
        "--stream-shards",
        "2",
        "--no-progress",
        "--eval-tokens",
        "128",
    ]
    result = _invoke(distill, args)
    assert result.exit_code == 0, result.output
    assert all(json.loads((out / f"stage{k}" / "spec.json").read_text())["stream"] for k in (1, 2, 3))
    ev = [
        "--model",
        str(out / "stage3"),
        "--teacher",
        str(teacher),
        "--data",
        str(corpus),
        "--seq-len",
        "256",
        "--max-tokens",
        "128",
        "--json",
    ]  # what `all` evaluates with
    result = _invoke(eval_cmd, [*ev, "--stream"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == json.loads((out / "eval.json").read_text())
    one_line_error(
        _invoke(
            distill,
            [
                "stage1",
                "--teacher",
                str(teacher),
                "--data",
                str(corpus),
                "--out",
                str(root / "y"),
                "--stream",
                "--stream-shards",
                "1000",
            ],
        ),
        "holds no documents",
        "--stream-shards",
    )
