"""The bad-input matrix: every `llamba` command run through the real top-level CLI on generated bad inputs.

Each case asserts a non-zero exit, exactly one `Error:` line that is an expected error (not the boundary's
"unexpected ..." line for a bug), no traceback, and that the finished run directory next to it is unchanged (its
files hashed before and after)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_corpus, write_tiny_teacher

from llamba.cli import main
from llamba.errors import UNEXPECTED


# --------------------------------------------------------------------------------------------------
# Fixtures: one tiny finished run, one tiny student checkpoint and its MLX export, bad files of every kind
# --------------------------------------------------------------------------------------------------
def tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _config_dir(path: Path, raw: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    torch.set_num_threads(1)
    from conftest import make_checkpoint, tiny_llamba_config

    root = tmp_path_factory.mktemp("bad")
    f: dict[str, Path] = {"root": root}
    teacher = f["teacher"] = write_tiny_teacher(root / "teacher")
    docs = tiny_corpus(n_docs=20, words_per_doc=60)
    corpus = f["corpus"] = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    f["one_blank"] = root / "one_blank_line.txt"
    f["one_blank"].write_text("\n\n".join(docs))

    run = f["run"] = root / "run"  # a finished `distill all`: every later case must leave it as it is
    result = CliRunner().invoke(
        main,
        [
            "distill",
            "all",
            "--teacher",
            str(teacher),
            "--data",
            str(corpus),
            "--out",
            str(run),
            "--tokens",
            "1200",
            "--seq-len",
            "16",
            "--eval-tokens",
            "64",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output

    # teachers that are not (readable) Llamas
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    gpt2.save_pretrained(root / "gpt2")
    f["gpt2"] = root / "gpt2"
    weights = teacher / "model.safetensors"
    blob = weights.read_bytes()
    header_len = struct.unpack("<Q", blob[:8])[0]
    for name, content in {
        "truncated": blob[: len(blob) // 2],
        "header_damaged": blob[:8] + b"#" * 16 + blob[24:],
        "header_length": struct.pack("<Q", 1 << 60) + blob[8:],
        "nan_payload": blob[: 8 + header_len] + b"\xff" * (len(blob) - 8 - header_len),
    }.items():
        shutil.copytree(teacher, root / name)
        (root / name / "model.safetensors").write_bytes(content)
        f[name] = root / name
    shutil.copytree(teacher, root / "bad_json")
    (root / "bad_json" / "config.json").write_text('{"model_type": "llama", ')
    f["bad_json"] = root / "bad_json"
    f["garbage_gguf"] = root / "teacher.gguf"
    f["garbage_gguf"].write_bytes(b"GGUF" + os.urandom(64))
    f["teacher3"] = write_tiny_teacher(root / "teacher3", layers=3, seed=1)

    # data files
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "empty.txt").write_text("")
    (root / "weights.bin").write_bytes(blob)
    shutil.copyfile(weights, root / "weights.safetensors")
    (root / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 20)
    (root / "body.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    (root / "null.jsonl").write_text(json.dumps({"text": docs[0]}) + "\n" + json.dumps({"text": None}) + "\n")
    (root / "numbers.jsonl").write_text("".join(json.dumps({"text": i}) + "\n" for i in range(20)))
    (root / "broken.jsonl").write_text(json.dumps({"text": docs[0]}) + '\n{"text": "pa\n')
    (root / "latin1.jsonl").write_bytes(
        json.dumps({"text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1")
    )
    pq.write_table(pa.table({"body": docs}), root / "body.parquet")
    pq.write_table(pa.table({"text": list(range(20))}), root / "ints.parquet")
    (root / "fake.parquet").write_bytes(b"PAR1 not really")
    (root / "empty_dir").mkdir()

    # student checkpoints and exports
    ckpt = f["ckpt"] = root / "ckpt"
    make_checkpoint(ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    for name, change in {
        "huge_chunk": {"chunk_size": 10**9},
        "neg_heads": {"n_v_heads": -4},
        "typo_key": {"chunk_sise": 8},
        "bool_conv": {"d_conv": True},
    }.items():
        shutil.copytree(ckpt, root / name)
        (root / name / "config.json").write_text(json.dumps(raw | change))
        f[name] = root / name
    shutil.copytree(ckpt, root / "trunc_ckpt")
    st = (ckpt / "model.safetensors").read_bytes()
    (root / "trunc_ckpt" / "model.safetensors").write_bytes(st[: len(st) // 3])
    f["trunc_ckpt"] = root / "trunc_ckpt"
    shutil.copytree(ckpt, root / "json_list")
    (root / "json_list" / "config.json").write_text("[1, 2]")
    f["json_list"] = root / "json_list"
    cfg576 = tiny_llamba_config(d_model=576, intermediate_size=1536, n_v_heads=9, n_qk_heads=9, d_state=64)
    f["w576"] = _config_dir(root / "w576", {**cfg576.to_dict(), "model_type": "llamba"})
    from llamba.export.convert import convert

    f["mlx"] = convert(ckpt, root / "mlx", dtype="float32")
    shutil.copytree(f["mlx"], root / "mlx_interrupted")
    for p in (root / "mlx_interrupted").glob("tokenizer*"):
        p.unlink()
    (root / "mlx_interrupted" / "chat_template.jinja").unlink(missing_ok=True)
    f["mlx_interrupted"] = root / "mlx_interrupted"
    shutil.copytree(f["mlx"], root / "mlx_huge_chunk")
    mlx_raw = json.loads((f["mlx"] / "config.json").read_text())
    (root / "mlx_huge_chunk" / "config.json").write_text(json.dumps(mlx_raw | {"chunk_size": 10**9}))
    f["mlx_huge_chunk"] = root / "mlx_huge_chunk"

    # icrl configs
    tiny = json.loads((Path(__file__).parents[1] / "icrl" / "configs" / "tiny.json").read_text())
    icrl_cases = {
        "typo_key": tiny | {"data": tiny["data"] | {"n_train_taskz": 4}},
        "typo_search": tiny | {"grid": tiny["grid"] | {"search": {"train.lrr": ["log", 1e-3, 1e-2]}}},
        "horizon0": tiny | {"env": {"horizon": 0}},
        "low_high": tiny | {"grid": tiny["grid"] | {"search": {"train.lr": ["log", 1e-2, 1e-3]}}},
        "size_neg": tiny
        | {
            "env": {"size": -3},
            "train": tiny["train"] | {"steps": 2},  # runs today: keep it short
            "grid": tiny["grid"] | {"draws": 1, "budgets": [{"n_train_tasks": 2}]},
        },
        "unknown_section": tiny | {"trian": {}},
    }
    for name, cfg in icrl_cases.items():
        (root / f"icrl_{name}.json").write_text(json.dumps(cfg))
    (root / "icrl_invalid.json").write_text('{"data": ')
    f["run_hash"] = tree_hash(run)
    return f


@pytest.fixture(autouse=True)
def _tracebacks_in_tmp(monkeypatch, tmp_path):
    """Unexpected errors save their traceback here, not in the user's cache."""
    monkeypatch.setenv("LLAMBA_TRACEBACKS", str(tmp_path / "tracebacks"))


def invoke(args: list[str]):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> str:
    """Non-zero exit, exactly one `Error:` line that is an expected error naming each needle, no traceback."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    assert UNEXPECTED not in errors[0], errors[0]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def unchanged_run(fx):
    yield fx["run"]
    assert tree_hash(fx["run"]) == fx["run_hash"], "the finished run directory changed"


def case(*values):
    """One row of a matrix, its id the first value."""
    return pytest.param(*values, id=values[0])


# --------------------------------------------------------------------------------------------------
# llamba distill stage1|stage2|stage3|all
# --------------------------------------------------------------------------------------------------
DISTILL_CASES = [  # (id, teacher key or path, data key or path, extra args, text the error names)
    case("teacher-not-llama", "gpt2", "corpus", [], "gpt2"),
    case("teacher-missing-dir", "./no-such-teacher", "corpus", [], "no-such-teacher"),
    case("teacher-truncated-safetensors", "truncated", "corpus", [], "truncated"),
    case("teacher-header-damaged", "header_damaged", "corpus", [], "header_damaged"),
    case("teacher-header-length", "header_length", "corpus", [], "header_length"),
    case("teacher-invalid-config-json", "bad_json", "corpus", [], "config.json"),
    case("teacher-garbage-gguf", "garbage_gguf", "corpus", [], "teacher.gguf"),
    case("data-missing", "teacher", "missing.jsonl", [], "missing.jsonl"),
    case("data-missing-bin", "teacher", "typo.bin", [], "typo.bin"),
    case("data-empty-file", "teacher", "empty.txt", [], "empty.txt"),
    case("data-empty-dir", "teacher", "empty_dir", [], "empty_dir"),
    case("data-binary-bin", "teacher", "weights.bin", [], "binary"),
    case("data-binary-safetensors", "teacher", "weights.safetensors", [], "binary"),
    case("data-non-utf8", "teacher", "latin1.txt", [], "UTF-8"),
    case("data-non-utf8-jsonl", "teacher", "latin1.jsonl", [], "UTF-8"),
    case("data-jsonl-no-field", "teacher", "body.jsonl", [], "'text'"),
    case("data-jsonl-null", "teacher", "null.jsonl", [], "null.jsonl:2"),
    case("data-jsonl-numbers", "teacher", "numbers.jsonl", [], "numbers.jsonl:1"),
    case("data-jsonl-broken-line", "teacher", "broken.jsonl", [], "broken.jsonl:2"),
    case("data-parquet-no-field", "teacher", "body.parquet", [], "'text'"),
    case("data-parquet-int-column", "teacher", "ints.parquet", [], "int64"),
    case("data-parquet-corrupt", "teacher", "fake.parquet", [], "fake.parquet"),
    case("data-stream-jsonl-no-field", "teacher", "body.jsonl", ["--stream"], "'text'"),
    case("data-stream-parquet-int-column", "teacher", "ints.parquet", ["--stream"], "int64"),
    case("tokens-zero", "teacher", "corpus", ["--tokens", "0"], "--tokens"),
    case("seq-len-one", "teacher", "corpus", ["--seq-len", "1"], "--seq-len"),
    case("lr-zero", "teacher", "corpus", ["--lr", "0"], "--lr"),
    case("lr-negative", "teacher", "corpus", ["--lr", "-1"], "--lr"),
    case("batch-size-zero", "teacher", "corpus", ["--batch-size", "0"], "--batch-size"),
    case("grad-accum-zero", "teacher", "corpus", ["--grad-accum", "0"], "--grad-accum"),
    case("temperature-zero", "teacher", "corpus", ["--temperature", "0"], "--temperature"),
    case("stream-shards-zero", "teacher", "corpus", ["--stream-shards", "0"], "--stream-shards"),
    case("init-bogus", "teacher", "corpus", ["--init", "bogus"], "--init"),
    case("precision-bogus", "teacher", "corpus", ["--precision", "fp8"], "--precision"),
    case("strategy-bogus", "teacher", "corpus", ["--strategy", "zero3"], "--strategy"),
    case("device-bogus", "teacher", "corpus", ["--device", "bogus"], "--device"),
    case("device-cuda7-on-cpu", "teacher", "corpus", ["--device", "cuda:7"], "--device"),
    case("device-mps", "teacher", "corpus", ["--device", "mps"], "--device"),
    case("lr-nan", "teacher", "corpus", ["--lr", "nan"], "--lr"),
]


def _resolve(fx, key: str) -> str:
    return str(fx[key]) if key in fx else (key if key.startswith("./") else str(fx["root"] / key))


@pytest.mark.parametrize("command", ["stage1", "all"])
@pytest.mark.parametrize("case, teacher, data, extra, needle", DISTILL_CASES)
def test_distill_bad_input(fx, unchanged_run, command, case, teacher, data, extra, needle):
    out = fx["root"] / f"out-{command}-{case}"
    result = invoke(
        [
            "distill",
            command,
            "--teacher",
            _resolve(fx, teacher),
            "--data",
            _resolve(fx, data),
            "--out",
            out,
            "--tokens",
            "64" if command == "stage1" else "1200",
            "--seq-len",
            "16",
            "--no-progress",
            *extra,
        ]
    )
    assert_one_line_error(result, needle)


@pytest.mark.parametrize(
    "command, teacher, data, needle",
    [
        ("all", "truncated", "corpus", "truncated"),
        ("all", "gpt2", "corpus", "gpt2"),
        # Another --data into a begun run is refused by the run's identity check before the data is read.
        ("stage2", "teacher", "weights.bin", "--data"),
        ("stage2", "teacher", "null.jsonl", "--data"),
        ("stage3", "bad_json", "corpus", "config.json"),
    ],
)
def test_bad_input_into_a_half_finished_run_leaves_it_unchanged(fx, command, teacher, data, needle):
    half = fx["root"] / "half"  # stage 1 done, stage 2 not started
    if not half.exists():
        shutil.copytree(fx["run"], half)
        for name in ("stage2", "stage3", "eval.json"):
            shutil.rmtree(half / name) if (half / name).is_dir() else (half / name).unlink(missing_ok=True)
    before = tree_hash(half)
    result = invoke(
        [
            "distill",
            command,
            "--teacher",
            _resolve(fx, teacher),
            "--data",
            _resolve(fx, data),
            "--out",
            half,
            "--tokens",
            "1200",
            "--seq-len",
            "16",
            "--no-progress",
        ]
    )
    assert_one_line_error(result, needle)
    assert tree_hash(half) == before


@pytest.mark.parametrize(
    "command",
    [
        case("stage1"),
        case("stage3"),
        "all",
    ],
)
def test_a_bad_teacher_into_the_finished_run_is_refused(fx, unchanged_run, command):
    result = invoke(
        [
            "distill",
            command,
            "--teacher",
            fx["truncated"],
            "--data",
            fx["corpus"],
            "--out",
            unchanged_run,
            "--tokens",
            "1200",
            "--seq-len",
            "16",
            "--no-progress",
        ]
    )
    assert_one_line_error(result, "truncated")


@pytest.mark.parametrize("command", ["stage2", "stage3"])
def test_distill_later_stages_refuse_bad_data(fx, command):
    out = fx["root"] / f"out-{command}-bin"
    result = invoke(
        [
            "distill",
            command,
            "--teacher",
            fx["teacher"],
            "--data",
            fx["root"] / "weights.bin",
            "--out",
            out,
            "--tokens",
            "64",
            "--seq-len",
            "16",
            "--no-progress",
        ]
    )
    assert_one_line_error(result, "binary")


def test_distill_init_from_a_checkpoint_with_an_absurd_chunk_size(fx):
    result = invoke(
        [
            "distill",
            "stage3",
            "--teacher",
            fx["teacher"],
            "--data",
            fx["corpus"],
            "--out",
            fx["root"] / "out-init-from",
            "--init-from",
            fx["huge_chunk"],
            "--tokens",
            "64",
            "--seq-len",
            "16",
            "--no-progress",
        ]
    )
    assert_one_line_error(result, "chunk_size")


def test_distill_out_that_is_a_file(fx):
    result = invoke(["distill", "all", "--teacher", fx["teacher"], "--out", fx["corpus"], "--no-progress"])
    assert_one_line_error(result, "--out")


def test_a_txt_with_one_blank_line_between_documents_trains(fx):
    """Was: 'the data produced no tokens' (the whole file was one document and the held-out split empty)."""
    result = invoke(
        [
            "distill",
            "stage1",
            "--teacher",
            fx["teacher"],
            "--data",
            fx["one_blank"],
            "--out",
            fx["root"] / "out-one-blank",
            "--tokens",
            "64",
            "--seq-len",
            "16",
            "--no-progress",
        ]
    )
    assert result.exit_code == 0, result.output


# Silent wrong results of issue 16 (exit 0 today): each must become a refusal.
def test_rerun_of_a_finished_run_with_another_budget_is_refused(fx, unchanged_run):
    result = invoke(
        [
            "distill",
            "all",
            "--teacher",
            fx["teacher"],
            "--data",
            fx["corpus"],
            "--out",
            unchanged_run,
            "--tokens",
            "2400",
            "--seq-len",
            "16",
            "--eval-tokens",
            "64",
            "--no-progress",
        ]
    )
    assert_one_line_error(result, "tokens")


def test_rerun_of_a_finished_run_with_another_teacher_is_refused(fx, unchanged_run):
    result = invoke(
        [
            "distill",
            "all",
            "--teacher",
            fx["teacher3"],
            "--data",
            fx["corpus"],
            "--out",
            unchanged_run,
            "--tokens",
            "1200",
            "--seq-len",
            "16",
            "--eval-tokens",
            "64",
            "--no-progress",
        ]
    )
    assert_one_line_error(result, "teacher")


def test_a_teacher_with_a_nan_payload_is_refused(fx):
    result = invoke(
        [
            "distill",
            "stage1",
            "--teacher",
            fx["nan_payload"],
            "--data",
            fx["corpus"],
            "--out",
            fx["root"] / "out-nan",
            "--tokens",
            "64",
            "--seq-len",
            "16",
            "--no-progress",
        ]
    )
    assert_one_line_error(result)


@pytest.mark.parametrize("lr", ["1e6", "inf"])
def test_an_lr_that_diverges_stops_at_the_first_non_finite_loss(fx, lr):
    result = invoke(
        [
            "distill",
            "stage1",
            "--teacher",
            fx["teacher"],
            "--data",
            fx["corpus"],
            "--out",
            fx["root"] / f"out-lr-{lr}",
            "--tokens",
            "256",
            "--seq-len",
            "16",
            "--lr",
            lr,
            "--no-progress",
        ]
    )
    assert_one_line_error(result)


def test_a_micro_batch_larger_than_the_budget_does_not_run_past_it(fx):
    out = fx["root"] / "out-microbatch"
    result = invoke(
        [
            "distill",
            "stage1",
            "--teacher",
            fx["teacher"],
            "--data",
            fx["corpus"],
            "--out",
            out,
            "--tokens",
            "16",
            "--seq-len",
            "16",
            "--batch-size",
            "32",
            "--no-progress",
        ]
    )
    if result.exit_code == 0:  # ran: then at most the budget (or a little over it)
        done = json.loads((out / "stage1" / "DONE.json").read_text())
        assert done["tokens"] <= 2 * 16, done
    else:
        assert_one_line_error(result, "--batch-size")


# --------------------------------------------------------------------------------------------------
# llamba eval
# --------------------------------------------------------------------------------------------------
EVAL_CASES = [  # (id, model key or path, teacher key, extra args, text the error names)
    case("model-missing", "nowhere", "teacher", [], "does not exist"),
    case("model-a-file", "corpus", "teacher", [], "is a file"),
    case("model-a-run-dir", "run", "teacher", [], "stage3"),
    case("model-a-teacher-dir", "teacher", "teacher", [], "not 'llamba'"),
    case("model-an-mlx-export", "mlx", "teacher", [], "MLX export"),
    case("model-chunk-size-1e9", "huge_chunk", "teacher", [], "chunk_size"),
    case("model-negative-heads", "neg_heads", "teacher", [], "n_v_heads"),
    case("model-misspelled-key", "typo_key", "teacher", [], "chunk_size"),
    case("model-bool-d-conv", "bool_conv", "teacher", [], "d_conv"),
    case("model-truncated-weights", "trunc_ckpt", "teacher", [], "model.safetensors"),
    case("model-config-json-list", "json_list", "teacher", [], "config.json"),
    case("teacher-not-llama", "ckpt", "gpt2", [], "gpt2"),
    case("teacher-truncated", "ckpt", "truncated", [], "truncated"),
    case("seq-len-one", "ckpt", "teacher", ["--seq-len", "1"], "--seq-len"),
    case("batch-size-zero", "ckpt", "teacher", ["--batch-size", "0"], "--batch-size"),
    case("device-bogus", "ckpt", "teacher", ["--device", "bogus"], "--device"),
]


@pytest.mark.parametrize("case, model, teacher, extra, needle", EVAL_CASES)
def test_eval_bad_input(fx, unchanged_run, case, model, teacher, extra, needle):
    result = invoke(
        [
            "eval",
            "--model",
            _resolve(fx, model),
            "--teacher",
            _resolve(fx, teacher),
            "--data",
            fx["corpus"],
            "--max-tokens",
            "64",
            "--seq-len",
            "16",
            *extra,
        ]
    )
    assert_one_line_error(result, needle)


def test_eval_bad_data(fx, unchanged_run):
    result = invoke(
        [
            "eval",
            "--model",
            fx["run"] / "stage3",
            "--teacher",
            fx["teacher"],
            "--data",
            fx["root"] / "weights.bin",
            "--max-tokens",
            "64",
            "--seq-len",
            "16",
        ]
    )
    assert_one_line_error(result, "binary")


def test_eval_against_a_teacher_with_another_layer_count_is_refused(fx, unchanged_run):
    result = invoke(
        [
            "eval",
            "--model",
            fx["run"] / "stage3",
            "--teacher",
            fx["teacher3"],
            "--data",
            fx["corpus"],
            "--max-tokens",
            "64",
            "--seq-len",
            "16",
        ]
    )
    assert_one_line_error(result, "layer")


# --------------------------------------------------------------------------------------------------
# llamba export mlx
# --------------------------------------------------------------------------------------------------
EXPORT_CASES = [  # (id, model key or path, out (relative to the fixture root, or absolute), extra, needle)
    case("out-a-file", "ckpt", "corpus.jsonl", [], "is a file"),
    case("out-under-a-file", "ckpt", "corpus.jsonl/sub", [], "is a file"),
    case("out-under-proc", "ckpt", "/proc/llamba-export", [], "cannot be created"),
    case("out-the-finished-run", "ckpt", "run", [], "not empty"),
    case("out-an-interrupted-export", "ckpt", "mlx_interrupted", [], "unfinished export"),
    case("model-missing", "nowhere", "new1", [], "does not exist"),
    case("model-a-run-dir", "run", "new2", [], "stage3"),
    case("model-an-mlx-export", "mlx", "new3", [], "MLX export"),
    case("model-chunk-size-1e9", "huge_chunk", "new4", [], "chunk_size"),
    case("model-truncated-weights", "trunc_ckpt", "new5", [], "model.safetensors"),
    case("q-group-size-128-on-576", "w576", "new6", ["--q-bits", "4", "--q-group-size", "128"], "576"),
    case("q-group-size-64-on-32", "ckpt", "new7", ["--q-bits", "8", "--q-group-size", "64"], "32"),
    case("q-bits-3", "ckpt", "new8", ["--q-bits", "3"], "--q-bits"),
    case("dtype-int8", "ckpt", "new9", ["--dtype", "int8"], "--dtype"),
    case("tokenizer-dir-without-one", "ckpt", "new10", ["--tokenizer", "empty_dir"], "--tokenizer"),
]


@pytest.mark.parametrize("case, model, out, extra, needle", EXPORT_CASES)
def test_export_bad_input(fx, unchanged_run, case, model, out, extra, needle):
    extra = [str(fx["root"] / a) if a == "empty_dir" else a for a in extra]
    target = Path(out) if out.startswith("/") else fx["root"] / out
    existed = target.exists()
    before = tree_hash(target) if target.is_dir() else None
    result = invoke(["export", "mlx", "--model", _resolve(fx, model), "--out", target, *extra])
    assert_one_line_error(result, needle)
    if before is not None:
        assert tree_hash(target) == before
    assert target.exists() == existed, "a failed export left its --out behind"


# --------------------------------------------------------------------------------------------------
# llamba chat / llamba generate
# --------------------------------------------------------------------------------------------------
ENGINE_CASES = [  # (id, model key or path, extra args, needle)
    case("model-missing", "nowhere", [], "does not exist"),
    case("model-a-file", "corpus", [], "is a file"),
    case("model-a-run-dir", "run", [], "stage3"),
    case("model-empty-dir", "empty_dir", [], "config.json"),
    case("model-a-teacher-dir", "teacher", [], "not 'llamba'"),
    case("model-chunk-size-1e9", "huge_chunk", [], "chunk_size"),
    case("model-truncated-weights", "trunc_ckpt", [], "model.safetensors"),
    case("model-config-json-list", "json_list", [], "config.json"),
    case("interrupted-export", "mlx_interrupted", [], "tokenizer"),
    case("export-chunk-size-1e9", "mlx_huge_chunk", [], "chunk_size"),
    case("backend-mlx-on-a-torch-checkpoint", "ckpt", ["--backend", "mlx"], "MLX"),
    case("backend-bogus", "ckpt", ["--backend", "jax"], "--backend"),
    case("top-p-zero", "ckpt", ["--top-p", "0"], "--top-p"),
    case("max-tokens-negative", "ckpt", ["--max-tokens", "-1"], "--max-tokens"),
]


@pytest.mark.parametrize("command", ["chat", "generate"])
@pytest.mark.parametrize("case, model, extra, needle", ENGINE_CASES)
def test_chat_and_generate_bad_input(fx, unchanged_run, command, case, model, extra, needle):
    prompt = ["--prompt", "hello"] if command == "generate" else []
    result = invoke([command, "--model", _resolve(fx, model), *prompt, *extra])
    assert_one_line_error(result, needle)


def test_generate_empty_prompt(fx):
    assert_one_line_error(invoke(["generate", "--model", fx["ckpt"], "--prompt", "", "--raw"]), "empty")


# --------------------------------------------------------------------------------------------------
# llamba icrl run
# --------------------------------------------------------------------------------------------------
ICRL_CASES = [  # (id, config file stem, text the error names)
    case("misspelled-key", "icrl_typo_key", "n_train_tasks"),
    case("unknown-section", "icrl_unknown_section", "trian"),
    case("invalid-json", "icrl_invalid", "icrl_invalid.json"),
    case("missing-file", "icrl_nowhere", "icrl_nowhere"),
    case("misspelled-search-key", "icrl_typo_search", "lr"),
    case("horizon-zero", "icrl_horizon0", "horizon"),
    case("search-low-above-high", "icrl_low_high", "train.lr"),
    case("env-size-negative", "icrl_size_neg", "size"),
]


@pytest.mark.parametrize("case, stem, needle", ICRL_CASES)
def test_icrl_run_bad_config(fx, case, stem, needle):
    out = fx["root"] / f"icrl-{case}"
    result = invoke(
        ["icrl", "run", "--env", "darkroom", "--config", fx["root"] / f"{stem}.json", "--out", out]
    )
    assert_one_line_error(result, needle)


@pytest.mark.parametrize("extra, needle", [(["--workers", "0"], "--workers"), (["--env", "maze"], "--env")])
def test_icrl_run_bad_options(fx, extra, needle):
    args = ["icrl", "run", "--env", "darkroom", "--config", "tiny", "--out", fx["root"] / "icrl-opts"]
    result = invoke(args[:2] + extra + args[2:] if extra[0] == "--workers" else args[:2] + extra + args[4:])
    assert_one_line_error(result, needle)


# --------------------------------------------------------------------------------------------------
# llamba demo, the boundary itself, and real processes
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--out", "corpus.jsonl"], "--out"),
        (["--q-bits", "3"], "--q-bits"),
        (["--tokens", "0"], "--tokens"),
        (["--max-tokens", "0"], "--max-tokens"),
    ],
)
def test_demo_bad_options(fx, extra, needle):
    extra = [str(fx["corpus"]) if a == "corpus.jsonl" else a for a in extra]
    assert_one_line_error(invoke(["demo", *extra]), needle)


def test_an_unexpected_error_is_one_line_with_the_saved_traceback(fx, monkeypatch, tmp_path):
    import llamba.export.chat as chat

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug\nsecond line")

    monkeypatch.setattr(chat, "TorchEngine", broken)
    monkeypatch.setenv("LLAMBA_TRACEBACKS", str(tmp_path / "tb"))
    result = invoke(["generate", "--model", fx["ckpt"], "--prompt", "hello", "--backend", "torch"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = [ln for ln in result.output.splitlines() if ln.strip()]
    assert line.startswith(f"Error: {UNEXPECTED} RuntimeError: simulated bug (full traceback in ")
    (saved,) = (tmp_path / "tb").iterdir()
    assert str(saved) in line
    text = saved.read_text()
    assert text.startswith("Traceback") and "simulated bug" in text and "def broken" not in line


def test_an_os_error_names_the_path():
    from llamba.errors import error_boundary

    with pytest.raises(Exception) as info, error_boundary():
        open("/proc/definitely/not/here")
    assert (
        info.value.format_message() == "/proc/definitely/not/here: no such file or directory; check the path"
    )


def _python_m_llamba(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "llamba", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["eval", "--model", "{root}/nowhere"], "does not exist"),
        (["generate", "--model", "{huge_chunk}", "--prompt", "hi"], "chunk_size"),
    ],
)
def test_python_m_llamba_prints_one_line(fx, unchanged_run, args, needle):
    proc = _python_m_llamba(*[a.format(root=fx["root"], huge_chunk=fx["huge_chunk"]) for a in args])
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], proc.stderr
