"""distill/long_eval.py: passkey / needle prompts (length, depth, determinism), scoring, perplexity by position
against a direct computation, the report on tiny models, and `llamba eval --long`."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from cli_checks import one_line_error
from click.testing import CliRunner
from conftest import CHAT_TEMPLATE, tiny_corpus, tiny_teacher

from llamba.distill import long_eval
from llamba.distill.chat_data import prompt_ids
from llamba.distill.cli import eval_cmd
from llamba.distill.init import build_student
from llamba.distill.long_eval import (
    ANSWER_TOKENS,
    FILLER,
    bucket_ppl,
    build_prompt,
    check_lengths,
    is_found,
    parse_lengths,
    passkey_found,
    position_nll,
)
from llamba.errors import UsageError


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE (400 tokens) trained on the module's own text, with a ChatML template: digits, names and
    punctuation tokenize as with a real tokenizer, and offsets work."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|im_end|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = [
        *FILLER,
        long_eval.PASSKEY_INTRO,
        long_eval.NEEDLE_INTRO,
        *long_eval.GROUPS,
        *long_eval.CITIES,
        "The pass key is 0123456789. system user assistant What is the secret city?",
        *tiny_corpus(4),
    ]
    core.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def models(tok):
    torch.set_num_threads(1)
    teacher = tiny_teacher(hidden=32, vocab_size=len(tok))  # max_position_embeddings 512
    student = build_student(teacher, chunk_size=16).eval()
    return teacher, student


def _sentence_tokens(tok) -> int:
    return max(len(tok(" " + s, add_special_tokens=False)["input_ids"]) for s in FILLER)


@pytest.mark.parametrize("task", ["passkey", "needle"])
@pytest.mark.parametrize("length", [256, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_prompt_fills_the_length_and_puts_the_needle_at_the_depth(tok, task, length, depth):
    p = build_prompt(tok, task, length, depth, seed=3)
    slack = (
        _sentence_tokens(tok) + 2
    )  # whole sentences only: the prompt ends within one sentence of the budget
    assert length - slack <= len(p.ids) + ANSWER_TOKENS[task] <= length
    assert abs(p.needle_depth - depth) <= (slack / 2) / p.filler_tokens  # at the nearest sentence boundary
    text = tok.decode(p.ids)
    needle = f"The pass key is {p.answer}." if task == "passkey" else f"is {p.answer}."
    assert (
        tok.decode(p.ids[p.needle_at :])
        .lstrip()
        .startswith("The pass key" if task == "passkey" else "The secret")
    )
    assert needle in text and text.count(p.answer) == (2 if task == "passkey" else 1)  # in the needle only
    user = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    assert p.ids == prompt_ids(tok, [{"role": "user", "content": user}])  # the chat report's prompt builder


def test_prompts_are_deterministic_and_the_filler_varies(tok):
    a, b = build_prompt(tok, "passkey", 1024, 0.5, 0), build_prompt(tok, "passkey", 1024, 0.5, 0)
    assert a == b
    c = build_prompt(tok, "passkey", 1024, 0.5, 1)
    assert c.answer != a.answer and c.ids != a.ids
    text = tok.decode(a.ids)
    used = [s for s in FILLER if s in text]
    assert len(used) == len(FILLER)  # every sentence, in shuffled blocks: no single repeated line
    assert not any(
        f"{s} {s}" in text for s in FILLER
    )  # never the same sentence twice in a row within a block
    assert not any(ch.isdigit() for s in FILLER for ch in s)  # the passkey is the only number


def test_bad_lengths_fail_in_one_line(tok, models):
    with pytest.raises(UsageError, match="too short for the passkey prompt"):
        build_prompt(tok, "passkey", 40, 0.5, 0)
    with pytest.raises(UsageError, match=r"max_position_embeddings 512"):
        check_lengths((256, 1024), models[0].config)
    assert parse_lengths("2k, 512,1K,512") == (512, 1024, 2048)
    for bad in ("abc", "0", "1m", ""):
        with pytest.raises(UsageError, match="--long-lengths"):
            parse_lengths(bad)
    with pytest.raises(UsageError, match="depth"):
        build_prompt(tok, "passkey", 256, 1.5, 0)


@pytest.mark.parametrize(
    "answer, right",
    [
        ("The pass key is 48213.", True),
        ("48213", True),
        ("48,213", True),
        ("4 8 2 1 3", True),
        ("pass key: 48213 is it", True),
        ("4821", False),
        ("482130", False),
        ("148213", False),
        ("The pass key is 12345.", False),
        ("", False),
        ("48213.5", False),  # another number
    ],
)
def test_passkey_scoring(answer, right):
    assert passkey_found(answer, "48213") is right


def test_needle_scoring(tok):
    p = build_prompt(tok, "needle", 256, 0.5, 0)
    assert is_found(p, f"It is {p.answer.upper()}.") and not is_found(p, "I do not know.")


@pytest.mark.parametrize("which", ["teacher", "student"])
@pytest.mark.parametrize("window", [5, 64])
def test_bucket_ppl_equals_a_direct_computation(models, which, window):
    model = models[0] if which == "teacher" else models[1]
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    edges = (0, 4, 8, 16, 32, 64)
    got = bucket_ppl(position_nll(model, ids, window=window), edges)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()  # (2, 40, v): one forward over the whole row
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (2, 39), t = 1..39
    want = []
    for lo, hi in zip(edges, edges[1:], strict=False):
        ts = [t for t in range(max(lo, 1), min(hi, 40))]
        if ts:
            mean = sum(float(nll[r, t - 1]) for r in range(2) for t in ts) / (2 * len(ts))
            want.append((lo, hi, 2 * len(ts), math.exp(mean)))
    assert [(b["lo"], b["hi"], b["tokens"]) for b in got] == [
        w[:3] for w in want
    ]  # the 32-64 bucket: t 32..39
    for b, w in zip(got, want, strict=True):
        assert b["ppl"] == pytest.approx(w[3], rel=1e-5), (b, w)


def test_report_on_tiny_models(tok, models):
    teacher, student = models
    settings = long_eval.LongSettings(
        lengths=(256, 512), depths=(0.1, 0.9), seeds=2, needle_seeds=1, answer_tokens=4
    )
    report = long_eval.long_report(student, teacher, tok, settings, log=lambda m: None)
    assert len(report["trials"]) == 2 * 2 * (2 + 1)
    for t in report["trials"]:
        assert t["prompt_tokens"] + 4 <= t["length"]
        assert t["teacher_right"] == is_found(
            build_prompt(tok, t["task"], t["length"], t["depth"], t["seed"], 4), t["teacher"]
        )
    cells = {(c["task"], c["length"], c["depth"]): c for c in report["cells"]}
    assert len(cells) == 2 * 2 * 2 and cells[("passkey", 512, 0.9)]["trials"] == 2
    pp = report["position_ppl"]
    assert pp["row_tokens"] == 512 and [b["hi"] for b in pp["buckets"]] == [128, 256, 512]
    (_, header, rows), (_, _, ppl_rows) = long_eval.tables(report)
    assert header == ["task", "length", "depth 10%", "depth 90%", "all depths"] and len(ppl_rows) == 3
    one = long_eval.LongSettings(lengths=(256,), depths=(0.5,), seeds=0, needle_seeds=1, ppl_rows=0)
    needle = long_eval.long_report(student, teacher, tok, one, log=lambda m: None)  # one task, no perplexity
    (t,) = needle["trials"]
    assert t["task"] == "needle" and t["answer_tokens"] == ANSWER_TOKENS["needle"]
    assert t["prompt_tokens"] + ANSWER_TOKENS["needle"] <= 256
    assert "position_ppl" not in needle and len(long_eval.tables(needle)) == 1
    assert [r[:2] for r in rows] == [
        ["passkey", "256"],
        ["passkey", "512"],
        ["needle", "256"],
        ["needle", "512"],
    ]


def test_eval_long_cli(tok, models, tmp_path):
    teacher, student = models
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    student.save_pretrained(tmp_path / "student")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus(20)))
    base = [
        "--model",
        str(tmp_path / "student"),
        "--teacher",
        str(tmp_path / "teacher"),
        "--data",
        str(corpus),
        "--seq-len",
        "32",
        "--max-tokens",
        "64",
        "--no-chat",
        "--long",
    ]
    result = CliRunner().invoke(eval_cmd, [*base, "--long-lengths", "256", "--long-seeds", "1", "--json"])
    assert result.exit_code == 0, result.output
    ev = json.loads(result.stdout)
    assert {c["task"] for c in ev["long"]["cells"]} == {"passkey", "needle"} and "teacher_ppl" in ev
    result = CliRunner().invoke(
        eval_cmd, [*base, "--long-lengths", "256", "--long-seeds", "1", "--long-needle-seeds", "0"]
    )
    assert result.exit_code == 0, result.output
    assert "depth 50%" in result.output and "perplexity by position" in result.output
    one_line_error(
        CliRunner().invoke(eval_cmd, [*base, "--long-lengths", "256,1k"]),
        "1024",
        "max_position_embeddings 512",
    )
    one_line_error(CliRunner().invoke(eval_cmd, [*base, "--long-lengths", "2x"]), "--long-lengths", "2x")
