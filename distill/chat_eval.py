"""Does the student answer like its teacher? Generation-based checks on prompts that never enter training
(distill/chat_prompts.py: FACT_EVAL, OPEN_EVAL, PROSE_EVAL):

    fact_retained     of the short factual questions the teacher answers right (greedy, chat template), the share
                      the student also answers right (a case-insensitive match of an accepted answer)
    chat_ppl_ratio    student / teacher perplexity on the teacher's own sampled answers to open prompts (assistant
                      tokens and their end-of-turn marker only)
    eos_rate          share of the student's greedy answers to the open prompts that end with an end-of-turn token
                      within `max_new_tokens` (256); `empty` counts answers with no text before it
    prose_ppl_ratio   student / teacher perplexity on general English prose (no template)

A perplexity on held-out rows of the training corpus (distill/evaluate.py) hides what these show: a student can
match that corpus and still answer every chat prompt with an empty turn.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from llamba.chat import prompt_ids
from llamba.distill.chat_data import (
    ChatMarkers,
    ChatSettings,
    assistant_mask,
    has_chat_template,
    left_pad,
    record_tokens,
    teacher_chat,
)
from llamba.generate import chat_stop_ids

FACT_TOKENS = 64
OPEN_TOKENS = 256
# The teacher's answers to the eval prompts: greedy for facts, sampled as the training data is for open prompts.
FACT_SETTINGS = ChatSettings(
    n=10_000, temperature=0.0, top_p=1.0, max_new_tokens=FACT_TOKENS, prompt_set="fact-eval"
)
OPEN_SETTINGS = ChatSettings(n=10_000, max_new_tokens=OPEN_TOKENS, prompt_set="open-eval")


def is_right(answer: str, accepted: tuple[str, ...]) -> bool:
    text = answer.lower()
    return any(a.lower() in text for a in accepted)


@torch.no_grad()
def student_answers(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    pad_id: int,
    batch_size: int = 32,
) -> list[tuple[list[int], bool]]:
    """Greedy answers of a Llamba student, batched: a left-padded prefill (padding leaves the state untouched),
    then one recurrent step per token; finished rows leave the batch. -> per prompt (ids, ended with a stop id)."""
    device = model.device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[tuple[list[int], bool] | None] = [None] * len(prompts)
    stop = set(stop_ids)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = left_pad([prompts[i] for i in idx], pad_id, device)
        state = model.alloc_state(len(idx))
        logits = model(ids, state=state, attention_mask=mask, num_last_tokens=1).logits[:, -1]
        live, answers, ended = list(idx), {i: [] for i in idx}, dict.fromkeys(idx, False)
        for _ in range(max_new_tokens):
            tokens = logits.argmax(-1).tolist()
            keep = record_tokens(live, tokens, stop, answers, ended)
            if not keep or len(answers[live[keep[0]]]) >= max_new_tokens:
                break
            if len(keep) < len(live):
                state.reorder_cache(torch.tensor(keep, device=device))
                live, tokens = [live[j] for j in keep], [tokens[j] for j in keep]
            logits = model.step(torch.tensor(tokens, device=device), state)
        for i in idx:
            out[i] = (answers[i], ended[i])
    return out  # type: ignore[return-value]


@torch.no_grad()
def answer_nll(model, rows: list[list[int]], masks: list[list[bool]], device) -> tuple[float, int]:
    """Summed next-token NLL of the masked target tokens of each row (one row at a time) -> (nll, count)."""
    nll, count = 0.0, 0
    for ids, m in zip(rows, masks, strict=True):
        x = torch.tensor([ids], device=device)
        logits = model(input_ids=x).logits[0, :-1].float()
        target = torch.tensor(m[1:], device=device)
        losses = F.cross_entropy(logits, x[0, 1:], reduction="none")
        nll += float(losses[target].sum())
        count += int(target.sum())
    return nll, count


def _ppl_ratio(student, teacher, rows, masks, device) -> dict:
    ns, c = answer_nll(student, rows, masks, device)
    nt, _ = answer_nll(teacher, rows, masks, device)
    ps, pt = math.exp(ns / max(c, 1)), math.exp(nt / max(c, 1))
    return {"tokens": c, "teacher_ppl": pt, "student_ppl": ps, "ratio": ps / pt}


def chat_report(student, teacher, tokenizer, n_show: int = 3, log=print) -> dict:
    """The generation-based report (module docstring) of a Llamba `student` against its HF `teacher`. The teacher's
    answers are cached like the chat corpus (shipped for the embedded teacher)."""
    from llamba.distill import chat_prompts

    if not has_chat_template(tokenizer):
        return {"skipped": "the tokenizer has no chat template"}
    device = student.device
    student.eval()
    stop = chat_stop_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    markers = ChatMarkers.of(tokenizer)

    facts = chat_prompts.FACT_EVAL
    t_facts = teacher_chat(teacher, tokenizer, replace(FACT_SETTINGS, n=len(facts)), log=log)
    opens = teacher_chat(teacher, tokenizer, replace(OPEN_SETTINGS, n=len(chat_prompts.OPEN_EVAL)), log=log)
    fact_prompts = [prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q, _ in facts]
    open_prompts = [prompt_ids(tokenizer, r["messages"][:1]) for r in opens]
    s_facts = student_answers(student, fact_prompts, FACT_TOKENS, stop, pad)
    s_open = student_answers(student, open_prompts, OPEN_TOKENS, stop, pad)

    t_text = [r["messages"][1]["content"] for r in t_facts]
    s_text = [tokenizer.decode(a, skip_special_tokens=True) for a, _ in s_facts]
    t_right = [is_right(a, acc) for a, (_, acc) in zip(t_text, facts, strict=True)]
    s_right = [is_right(a, acc) for a, (_, acc) in zip(s_text, facts, strict=True)]
    both = sum(t and s for t, s in zip(t_right, s_right, strict=True))

    # chat perplexity on the teacher's answers (with their end-of-turn marker where the answer ended)
    rows = [tokenizer(_full_text(tokenizer, r), add_special_tokens=False)["input_ids"] for r in opens]
    masks = [assistant_mask(torch.tensor([ids]), markers)[0].tolist() for ids in rows]
    chat = _ppl_ratio(student, teacher, rows, masks, device)
    prose_rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chat_prompts.PROSE_EVAL]
    prose = _ppl_ratio(student, teacher, prose_rows, [[True] * len(r) for r in prose_rows], device)

    s_open_text = [tokenizer.decode(a, skip_special_tokens=True) for a, _ in s_open]
    ended = [e and bool(t.strip()) for (_, e), t in zip(s_open, s_open_text, strict=True)]
    empty = sum(not t.strip() for t in s_open_text + s_text)
    report = {
        "fact_questions": len(facts),
        "teacher_facts_right": sum(t_right),
        "student_facts_right": sum(s_right),
        "student_right_of_teacher_right": both,
        "fact_retained": both / max(1, sum(t_right)),
        "chat_ppl_ratio": chat["ratio"],
        "chat_teacher_ppl": chat["teacher_ppl"],
        "chat_student_ppl": chat["student_ppl"],
        "chat_tokens": chat["tokens"],
        "prose_ppl_ratio": prose["ratio"],
        "prose_teacher_ppl": prose["teacher_ppl"],
        "prose_student_ppl": prose["student_ppl"],
        "prose_tokens": prose["tokens"],
        "eos_rate": sum(ended) / max(1, len(ended)),
        "open_prompts": len(ended),
        "empty_answers": empty,
        "open_max_new_tokens": OPEN_TOKENS,
        "examples": [
            {"prompt": facts[i][0], "teacher": t_text[i], "student": s_text[i]} for i in range(len(facts))
        ]
        + [
            {"prompt": r["messages"][0]["content"], "teacher": r["messages"][1]["content"], "student": s}
            for r, s in zip(opens, s_open_text, strict=True)
        ],
    }
    report["show"] = show_examples(report, n_show)
    return report


def show_examples(report: dict, n: int = 3) -> list[dict]:
    """n examples for a side-by-side: the first fact the teacher gets right, then open prompts."""
    ex = report.get("examples", [])
    k = report.get("fact_questions", 0)
    return (ex[:1] + ex[k : k + n - 1])[:n]


def _full_text(tokenizer, record: dict) -> str:
    """Prompt and the teacher's first answer; a cut answer (no end-of-turn in the record) gets no end marker, so
    the mask covers its content only."""
    from llamba.distill.chat_data import render

    if record.get("ended", True):
        return render(tokenizer, record["messages"][:2])
    head = tokenizer.apply_chat_template(record["messages"][:1], tokenize=False, add_generation_prompt=True)
    return head + record["messages"][1]["content"]
