"""Chat data from the teacher (distill/chat_data.py), its loss mask, and the chat report (distill/chat_eval.py),
on a tiny random Llama with a ChatML tokenizer."""

import json

import pytest
import torch
from conftest import CHAT_VOCAB, tiny_chat_tokenizer, tiny_teacher

from llamba.chat import prompt_ids
from llamba.distill import chat_data
from llamba.distill.chat_data import (
    ChatMarkers,
    ChatSettings,
    assistant_mask,
    read_records,
    render,
    sample_answers,
    teacher_chat,
    teacher_fingerprint,
)
from llamba.distill.losses import kd_loss
from llamba.generate import SamplingParams, process_logits


@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer()


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher(vocab_size=CHAT_VOCAB, seed=3)


def words(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_assistant_mask_marks_answers_and_their_end_marker(tok):
    m = ChatMarkers.of(tok)
    conv = render(
        tok,
        [
            {"role": "system", "content": "ba"},
            {"role": "user", "content": "be bi"},
            {"role": "assistant", "content": "bo bu ba"},
        ],
    )
    ids = words(tok, conv)  # <s> system ba </s> <s> user be bi </s> <s> assistant bo bu ba </s>
    row = torch.tensor([ids])
    expect = [False] * 11 + [True] * 4
    assert assistant_mask(row, m)[0].tolist() == expect
    # a row cut by the packer inside an answer: the prefix up to the first end marker counts
    cut = torch.tensor([ids[12:] + ids[:5]])  # bu ba </s> <s> system ba </s> ...
    assert assistant_mask(cut, m)[0].tolist() == [True, True, True] + [False] * 5
    # a row inside a user turn that opens an assistant turn later
    cut = torch.tensor([ids[7:]])  # bi </s> <s> assistant bo bu ba </s>
    assert assistant_mask(cut, m)[0].tolist() == [True, True, False, False, True, True, True, True]
    plain = torch.tensor([words(tok, "ba be bi bo")])
    assert assistant_mask(plain, m).all()
    assert assistant_mask(plain, None).all()


def test_kd_loss_weights_select_positions():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    w = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.bool)
    picked = kd_loss(s[w][None], t[w][None])
    assert torch.allclose(kd_loss(s, t, weights=w), picked, rtol=1e-6)
    assert torch.allclose(kd_loss(s, t, weights=torch.ones(2, 5)), kd_loss(s, t), rtol=1e-6)


def _full_sort_top_p(logits, p):
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, -1)
    drop_sorted = (torch.cumsum(probs, -1) - probs) >= p
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return torch.log_softmax(logits.masked_fill(drop, float("-inf")), -1)


@pytest.mark.parametrize(
    "scale", [0.5, 8.0]
)  # flat rows (the full-sort fallback) and peaked rows (top-k path)
def test_fast_top_p_equals_the_full_sort(scale):
    torch.manual_seed(1)
    logits = torch.randn(4, 5000) * scale
    params = SamplingParams(temperature=1.0, top_p=0.9)
    fast, ref = process_logits(logits, params), _full_sort_top_p(logits, 0.9)
    assert torch.equal(torch.isinf(fast), torch.isinf(ref))
    assert torch.allclose(fast[~torch.isinf(fast)], ref[~torch.isinf(ref)], atol=1e-6)


def test_greedy_sampler_equals_transformers_generate(teacher, tok):
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in ("ba", "be bi bo bu", "da de")]
    eos = (tok.eos_token_id,)
    got = sample_answers(
        teacher,
        prompts,
        [0, 1, 2],
        SamplingParams(temperature=0, max_new_tokens=12),
        eos,
        tok.pad_token_id,
        batch_size=3,
    )
    for p, (answer, ended) in zip(prompts, got, strict=True):
        ref = teacher.generate(
            torch.tensor([p]),
            do_sample=False,
            max_new_tokens=12,
            eos_token_id=list(eos),
            pad_token_id=tok.pad_token_id,
        )[0, len(p) :].tolist()
        want = ref[: ref.index(eos[0])] if eos[0] in ref else ref
        assert answer == want and ended == (eos[0] in ref)


def test_a_rows_sample_does_not_depend_on_its_batch(teacher, tok):
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in ("ba be", "bi", "bo bu da de")]
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16)
    together = sample_answers(teacher, prompts, [7, 8, 9], params, (tok.eos_token_id,), tok.pad_token_id)
    alone = [
        sample_answers(teacher, [p], [s], params, (tok.eos_token_id,), tok.pad_token_id)[0]
        for p, s in zip(prompts, [7, 8, 9], strict=True)
    ]
    assert together == alone
    other = sample_answers(teacher, prompts[:1], [99], params, (tok.eos_token_id,), tok.pad_token_id)
    assert other[0] != together[0]  # the seed matters


def test_fingerprint_ignores_fp32_vs_bf16_and_tells_teachers_apart(teacher):
    fp = teacher_fingerprint(teacher)
    assert teacher_fingerprint(tiny_teacher(vocab_size=CHAT_VOCAB, seed=3).to(torch.bfloat16)) == fp
    assert teacher_fingerprint(tiny_teacher(vocab_size=CHAT_VOCAB, seed=4)) != fp


def test_corpus_is_cached_extended_and_resumed(teacher, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMBA_CACHE", str(tmp_path))
    monkeypatch.setattr(chat_data, "SHIPPED_DIR", tmp_path / "shipped")
    settings = ChatSettings(n=5, max_new_tokens=8)
    calls = []
    real = chat_data.generate_records
    monkeypatch.setattr(chat_data, "generate_records", lambda *a, **k: calls.append(a[3:5]) or real(*a, **k))
    first = teacher_chat(teacher, tok, settings, batch_size=2, log=lambda _: None)
    assert [r["id"] for r in first] == list(range(5)) and calls
    assert all(r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant" for r in first)
    calls.clear()
    assert teacher_chat(teacher, tok, settings, log=lambda _: None) == first and not calls  # cached
    path = chat_data.corpus_path(teacher_fingerprint(teacher), settings)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]) + lines[3][:10])  # a kill in the middle of writing line 4
    assert len(read_records(path)) == 3
    again = teacher_chat(teacher, tok, ChatSettings(n=7, max_new_tokens=8), batch_size=2, log=lambda _: None)
    assert calls[0] == (3, 7)  # only the missing records were sampled
    assert again[:5] == first  # the same records: each row has its own generator
    # a shipped file with the same key is read without sampling
    calls.clear()
    ship = chat_data.shipped_path(teacher_fingerprint(teacher), settings)
    ship.parent.mkdir()
    ship.write_text("".join(json.dumps(r) + "\n" for r in again))
    path.unlink()
    assert teacher_chat(teacher, tok, settings, log=lambda _: None) == first and not calls


def test_chat_documents_are_rendered_conversations_and_drop_cut_answers(tok):
    recs = [
        {
            "id": 0,
            "messages": [{"role": "user", "content": "ba"}, {"role": "assistant", "content": "be"}],
            "ended": True,
        },
        {
            "id": 1,
            "messages": [{"role": "user", "content": "bi"}, {"role": "assistant", "content": "bo"}],
            "ended": False,
        },
    ]
    docs = chat_data.chat_documents(recs, tok)
    assert docs == ["<|im_start|>user\nba<|im_end|>\n<|im_start|>assistant\nbe<|im_end|>"]
    from llamba.distill.data import doc_tokens

    ids = doc_tokens(tok, docs[0])
    assert ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id  # no doubled EOS between conversations


def test_student_batched_greedy_equals_one_at_a_time(tok):
    from llamba.distill.chat_eval import student_answers
    from llamba.distill.init import build_student
    from llamba.generate import generate

    student = build_student(tiny_teacher(vocab_size=CHAT_VOCAB, seed=5), seed=0).eval()
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in ("ba", "be bi bo bu da", "de")]
    got = student_answers(student, prompts, 10, (tok.eos_token_id,), tok.pad_token_id, batch_size=3)
    for p, (answer, ended) in zip(prompts, got, strict=True):
        ref = generate(student, p, max_new_tokens=10, stop_token_ids=(tok.eos_token_id,))
        want = ref[:-1] if ref and ref[-1] == tok.eos_token_id else ref
        assert answer == want and ended == (bool(ref) and ref[-1] == tok.eos_token_id)


def test_model_card_leads_with_the_chat_report():
    from conftest import tiny_llamba_config

    from llamba.card import model_card

    config = tiny_llamba_config()
    config.distillation = {
        "teacher": "default",
        "tokens": 150000,
        "ppl_ratio": 5.57,
        "data": "chat:768",
        "fact_retained": 0.04,
        "chat_ppl_ratio": 10.28,
        "prose_ppl_ratio": 4.0,
        "eos_rate": 0.42,
    }
    card = model_card(config)
    assert "| chat perplexity ratio (teacher's sampled answers) | 10.28 |" in card
    assert "| answers that end (end-of-turn within 256 tokens) | 42% |" in card
    assert card.index("chat perplexity ratio") < card.index("training-corpus split")
