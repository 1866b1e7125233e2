"""Long context, measured: does the student use what it was given? (issue 25)

    passkey       a random 5-digit number hidden at a depth (share of the filler before it: 10%, 50%, 90%) in
                  filler text, asked for at the end through the teacher's chat template; greedy, ANSWER_TOKENS
                  new tokens (16; 32 for the needle); right when the digits appear in the answer (`passkey_found`)
    needle        a made-up fact ("The secret city of the Amber Guild is Velmora.") hidden the same way, then
                  asked about; right when the city's name appears in the answer
    position ppl  teacher and student perplexity by position bucket (0-128, 128-256, ..., 4k-8k tokens of
                  context before the predicted token) on long held-out text: does the loss keep falling with
                  more context, as the teacher's does?

A length is the whole budget: prompt (template, instructions, filler, needle, question) + answer tokens, so an
8k cell stays inside the teacher's 8,192-token window. The filler is this module's own FILLER sentences, each
block of them in a fresh order drawn from the trial's seed (no download, no repeated single sentence); every
prompt is a pure function of (task, length, depth, seed) and the tokenizer.

The long text is the held-out split of `--data python-docs` (distill/data.py: the CPython language reference
shipped with Python, `pydoc_data.topics`, cut into ~2,000-character sections, 10% held out by a fixed seed; 25
sections, ~11.6k SmolLM2 tokens) in the reference's own order, joined with blank lines. No student trained on
chat data has seen it; it is one genre throughout (technical English prose with code), so the buckets compare like
with like, but it is not one document: the topic changes every ~450 tokens on average, so late buckets measure
what the running context of the reference gives, not recall of one long story.

Generation reuses the chat report's greedy paths (distill/chat_eval.student_answers: one prefill through the
chunked scan, then O(1) recurrent steps; distill/chat_data.sample_answers: the teacher with a KV cache), one
prompt at a time (no padding; a padded batch of 8k prompts would make the teacher's attention mask L x L).
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from llamba.distill.chat_data import has_chat_template, sample_answers
from llamba.distill.chat_eval import is_right, student_answers
from llamba.errors import UsageError
from llamba.generate import SamplingParams, chat_stop_ids

LENGTHS = (512, 1024, 2048, 4096, 8192)
DEPTHS = (0.1, 0.5, 0.9)
BUCKET_EDGES = (0, 128, 256, 512, 1024, 2048, 4096, 8192)
# Greedy new tokens per answer. The teacher restates the question: "The pass key is 48213." is 11 SmolLM2 tokens,
# "The secret city of the Brotherhood of the Quiet Bell is Calloway Reach." 17 (16 cut such answers short).
ANSWER_TOKENS = {"passkey": 16, "needle": 32}
PPL_WINDOW = 1024  # tokens per LM-head slice (the (l, vocab) fp32 logits of an 8k row would be 1.6 GB)
TASKS = ("passkey", "needle")

# Ordinary sentences with no digits and no city in them, so the needle is the only place the answer is.
FILLER = (
    "The grass in the meadow grows a little taller every week.",
    "A light rain fell over the valley during the afternoon.",
    "The baker opened the shop early and set out the morning bread.",
    "Boats drifted slowly along the river past the old mill.",
    "In the library, the clocks ticked in no particular hurry.",
    "The hills to the north turned gold as the sun went down.",
    "A cat slept on the warm stones beside the garden wall.",
    "Travelers stopped at the inn to rest their horses and eat a simple meal.",
    "The wind carried the smell of pine across the quiet road.",
    "Children played by the fountain while their parents talked in the shade.",
    "The market sold apples, onions, wool and bright blue pottery.",
    "Far away, a train whistled as it crossed the long iron bridge.",
    "The teacher wrote the day's lesson on the board in careful letters.",
    "Clouds gathered over the sea and then broke apart again.",
    "An old map hung on the wall of the post office, its edges curled.",
    "The farmer counted the sheep twice before closing the gate.",
)
GROUPS = (
    "Amber Guild",
    "Silent Cartographers",
    "Order of the Blue Lantern",
    "Copper Owls",
    "Salt Weavers",
    "Night Orchard Society",
    "Glass Herons",
    "Brotherhood of the Quiet Bell",
)
CITIES = (
    "Velmora",
    "Quistane",
    "Oradell Vey",
    "Tamsk",
    "Brunhaven",
    "Izmareth",
    "Calloway Reach",
    "Pellinor",
)

PASSKEY_INTRO = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it: I will ask "
    "you for the pass key at the end."
)
NEEDLE_INTRO = "Somewhere in the text below is a fact about a secret city. Read carefully and remember it."


@dataclass(frozen=True)
class LongPrompt:
    task: str  # "passkey" | "needle"
    length: int  # the budget: len(ids) + answer tokens <= length
    depth: float  # asked: share of the filler tokens before the needle
    seed: int
    ids: list[int]  # the user turn through the chat template, assistant header included
    answer: str  # what a right answer contains (the digits, or the city)
    needle_at: int  # token index where the needle sentence starts
    needle_depth: float  # measured: filler tokens before the needle / all filler tokens
    filler_tokens: int


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------
def filler_stream(rng: random.Random):
    """FILLER sentences forever, each block of len(FILLER) in a fresh order from `rng`."""
    while True:
        block = list(FILLER)
        rng.shuffle(block)
        yield from block


def _needle(task: str, rng: random.Random) -> tuple[str, str, str, str]:
    """-> (intro, needle sentence, question, answer)."""
    if task == "passkey":
        key = str(rng.randint(10000, 99999))
        return (
            PASSKEY_INTRO,
            f"The pass key is {key}. Remember it. {key} is the pass key.",
            "What is the pass key? Answer with the number only.",
            key,
        )
    if task == "needle":
        group, city = rng.choice(GROUPS), rng.choice(CITIES)
        return (
            NEEDLE_INTRO,
            f"The secret city of the {group} is {city}.",
            f"What is the secret city of the {group}? Answer with the name of the city only.",
            city,
        )
    raise UsageError(f"unknown long-context task {task!r} (choose from {', '.join(TASKS)})")


def _encode(tokenizer, content: str):
    """content of one user turn -> (templated text, its encoding with offsets); the ids equal llamba.chat.prompt_ids."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return text, tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)


def _token_at(offsets: list[tuple[int, int]], char: int) -> int:
    """Index of the first token that ends after character `char` (the token holding it)."""
    for i, (_, end) in enumerate(offsets):
        if end > char:
            return i
    return len(offsets)


def build_prompt(
    tokenizer, task: str, length: int, depth: float, seed: int, answer_tokens: int | None = None
) -> LongPrompt:
    """The longest prompt of `task` with whole filler sentences that leaves `answer_tokens` of `length`, the needle
    after the filler sentence boundary nearest to `depth` of the filler's tokens."""
    if not 0.0 <= depth <= 1.0:
        raise UsageError(f"depth {depth} is not in [0, 1] (the share of the filler before the needle)")
    answer_tokens = answer_tokens or ANSWER_TOKENS.get(task, 0)
    rng = random.Random(f"{task}:{length}:{depth}:{seed}")
    intro, needle, question, answer = _needle(task, rng)
    budget = length - answer_tokens
    stream = filler_stream(rng)
    sentences: list[str] = []
    counts: list[int] = [
        0
    ]  # cumulative token counts of the sentences (each with its leading space), approximate

    def content(n: int) -> str:
        while len(sentences) < n:
            sentences.append(next(stream))
            counts.append(
                counts[-1] + len(tokenizer(" " + sentences[-1], add_special_tokens=False)["input_ids"])
            )
        k = min(range(n + 1), key=lambda j: abs(counts[j] - depth * counts[n]))  # sentences before the needle
        parts = [*sentences[:k], needle, *sentences[k:n]]
        return f"{intro}\n\n{' '.join(parts)}\n\n{question}"

    def n_tokens(n: int) -> int:
        return len(_encode(tokenizer, content(n))[1]["input_ids"])

    if n_tokens(1) > budget:
        raise UsageError(
            f"length {length} is too short for the {task} prompt: template, instructions, needle, "
            f"one filler sentence and {answer_tokens} answer tokens take {n_tokens(1) + answer_tokens}"
        )
    lo, hi = 1, 2
    while n_tokens(hi) <= budget:  # grow, then bisect: the largest n whose prompt fits
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if n_tokens(mid) <= budget else (lo, mid)
    body = content(lo)
    text, enc = _encode(tokenizer, body)
    offsets = enc["offset_mapping"]
    start = text.index(body) + len(intro) + 2  # first filler character (or the needle's, at depth 0)
    at = text.index(needle, start)
    end = text.index(f"\n\n{question}", at + len(needle))  # after the last filler sentence
    t_start, t_needle = _token_at(offsets, start), _token_at(offsets, at)
    t_after, t_end = _token_at(offsets, at + len(needle)), _token_at(offsets, end)
    filler = (t_needle - t_start) + (t_end - t_after)
    return LongPrompt(
        task,
        length,
        depth,
        seed,
        list(enc["input_ids"]),
        answer,
        t_needle,
        (t_needle - t_start) / max(filler, 1),
        filler,
    )


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------
def passkey_found(answer: str, key: str) -> bool:
    """The digits of `key` as one number in `answer` ("48213", "48,213", "4 8 2 1 3"), not inside a longer one."""
    joined = re.sub(r"(?<=\d)[\s,._'](?=\d)", "", answer)
    return re.search(rf"(?<!\d){re.escape(key)}(?!\d)", joined) is not None


def is_found(prompt: LongPrompt, answer: str) -> bool:
    return (
        passkey_found(answer, prompt.answer)
        if prompt.task == "passkey"
        else is_right(answer, (prompt.answer,))
    )


# --------------------------------------------------------------------------------------------------
# Perplexity by position
# --------------------------------------------------------------------------------------------------
def _row_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # logits: (b, w, v) predicting targets: (b, w') with w' <= w -> nll (b, w') fp32
    return F.cross_entropy(logits[:, : targets.shape[1]].float().transpose(1, 2), targets, reduction="none")


@torch.no_grad()
def position_nll(model, ids: torch.Tensor, window: int = PPL_WINDOW) -> torch.Tensor:
    """ids: (b, l) -> nll (b, l - 1) fp32, nll[:, t - 1] = -log p(ids[:, t] | ids[:, :t]).

    A Llamba student reads the row in windows of `window` tokens, its recurrent state carried from one to the next
    (memory flat in l; equal to one forward over the row); an HF teacher runs one forward and its LM head is applied
    window by window."""
    b, l = ids.shape
    out = []
    if hasattr(model, "alloc_state"):
        state = model.alloc_state(b)
        for a in range(0, l - 1, window):
            logits = model(ids[:, a : a + window], state=state).logits  # (b, w, v)
            out.append(_row_nll(logits, ids[:, a + 1 : a + window + 1]))
    else:
        h = model.model(input_ids=ids).last_hidden_state  # (b, l, d)
        for a in range(0, l - 1, window):
            out.append(_row_nll(model.lm_head(h[:, a : a + window]), ids[:, a + 1 : a + window + 1]))
    return torch.cat(out, dim=1)


def bucket_ppl(nll: torch.Tensor, edges=BUCKET_EDGES) -> list[dict]:
    """nll: (b, l - 1) from `position_nll` -> per bucket [lo, hi) of positions t (tokens of context before the
    predicted token; t >= 1) that the row reaches: {lo, hi, tokens, ppl}."""
    rows = []
    for lo, hi in zip(edges, edges[1:], strict=False):
        part = nll[:, max(lo, 1) - 1 : hi - 1]  # positions t in [max(lo, 1), hi)
        if part.numel():
            rows.append(
                {"lo": lo, "hi": hi, "tokens": part.numel(), "ppl": math.exp(float(part.double().mean()))}
            )
    return rows


def long_text_ids(tokenizer, n_tokens: int, rows: int = 1) -> torch.Tensor:
    """The held-out long text (module docstring) -> (rows, n) token ids, n = min(n_tokens, its length); row r starts
    r * (len - n) / (rows - 1) tokens in, so rows overlap when the text is shorter than rows * n."""
    from llamba.distill.data import python_docs_corpus, split_documents

    docs = python_docs_corpus()
    order = {d: i for i, d in enumerate(docs)}
    held = sorted(split_documents(docs)[1], key=order.__getitem__)
    ids = tokenizer("\n\n".join(held), add_special_tokens=False)["input_ids"]
    n = min(n_tokens, len(ids))
    starts = [round(r * (len(ids) - n) / max(rows - 1, 1)) for r in range(rows)]
    return torch.tensor([ids[s : s + n] for s in starts])


def position_report(student, teacher, ids: torch.Tensor, edges=BUCKET_EDGES) -> list[dict]:
    """ids: (rows, l) on the models' device -> per bucket {lo, hi, tokens, teacher_ppl, student_ppl, ratio}."""
    t = bucket_ppl(position_nll(teacher, ids), edges)
    s = bucket_ppl(position_nll(student, ids), edges)
    return [
        {
            "lo": a["lo"],
            "hi": a["hi"],
            "tokens": a["tokens"],
            "teacher_ppl": a["ppl"],
            "student_ppl": b["ppl"],
            "ratio": b["ppl"] / a["ppl"],
        }
        for a, b in zip(t, s, strict=True)
    ]


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
def parse_lengths(text: str) -> tuple[int, ...]:
    """'512,1k,2k' -> (512, 1024, 2048), sorted, k = 1024."""
    out = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(k?)\s*", part.lower())
        if not m or int(m.group(1)) == 0:
            raise UsageError(
                f"--long-lengths: {part.strip()!r} is not a length in tokens (e.g. 512,1k,2k,4k,8k)"
            )
        out.add(int(m.group(1)) * (1024 if m.group(2) else 1))
    return tuple(sorted(out))


def check_lengths(lengths, teacher_config) -> None:
    """Every length inside the teacher's window (its max_position_embeddings)."""
    limit = getattr(teacher_config, "max_position_embeddings", None)
    over = [n for n in lengths if limit is not None and n > limit]
    if over:
        raise UsageError(
            f"long-context length {over[0]} is above the teacher's max_position_embeddings {limit} "
            f"(its context window); use lengths up to {limit}"
        )


@dataclass(frozen=True)
class LongSettings:
    """What the long-context report asks: `seeds` passkey and `needle_seeds` needle prompts (0: not that task) per
    (length, depth), `answer_tokens` new tokens (default: ANSWER_TOKENS of the task), perplexity by position on
    `ppl_rows` rows (0: none) of long text as long as the longest length."""

    lengths: tuple[int, ...] = LENGTHS
    depths: tuple[float, ...] = DEPTHS
    seeds: int = 2
    needle_seeds: int = 1
    ppl_rows: int = 1
    answer_tokens: int | None = None


def long_report(student, teacher, tokenizer, settings: LongSettings = LongSettings(), log=print) -> dict:
    """Passkey and needle retrieval at every (length, depth) of `settings`, teacher and student greedy on the same
    ids; then perplexity by position. -> dict: `cells` (one per task, length, depth), `trials` (every answer),
    `position_ppl`, `seconds`."""
    depths, seeds, needle_seeds = settings.depths, settings.seeds, settings.needle_seeds
    ppl_rows, answer_tokens, lengths = settings.ppl_rows, settings.answer_tokens, settings.lengths
    lengths = tuple(sorted(set(lengths)))
    check_lengths(lengths, teacher.config)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise UsageError(
            f"student vocab_size {student.config.vocab_size} != teacher vocab_size "
            f"{teacher.config.vocab_size}: they were not distilled from each other"
        )
    student.eval()
    budgets = {task: answer_tokens or ANSWER_TOKENS[task] for task in TASKS}
    counts = {"passkey": seeds, "needle": needle_seeds}
    report: dict = {
        "lengths": list(lengths),
        "depths": list(depths),
        "seeds": seeds,
        "needle_seeds": needle_seeds,
        "answer_tokens": budgets,
        "cells": [],
        "trials": [],
        "seconds": {"teacher": 0.0, "student": 0.0},
    }
    if not has_chat_template(tokenizer):
        report["skipped"] = "the tokenizer has no chat template: no passkey or needle prompts"
        counts = dict.fromkeys(TASKS, 0)
    stop = chat_stop_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    for length in lengths:
        said, secs = [], [0.0, 0.0]
        for task in (t for t in TASKS if counts[t]):
            n_new = budgets[task]
            prompts = [
                build_prompt(tokenizer, task, length, d, s, n_new)
                for d in depths
                for s in range(counts[task])
            ]
            ids = [p.ids for p in prompts]
            t0 = time.perf_counter()
            greedy = SamplingParams(temperature=0.0, max_new_tokens=n_new)
            t_ans = sample_answers(teacher, ids, [0] * len(ids), greedy, stop, pad, batch_size=1)
            t1 = time.perf_counter()
            s_ans = student_answers(student, ids, n_new, stop, pad, batch_size=1)
            secs[0], secs[1] = secs[0] + t1 - t0, secs[1] + time.perf_counter() - t1
            trials = []
            for p, (ta, _), (sa, _) in zip(prompts, t_ans, s_ans, strict=True):
                t_text = tokenizer.decode(ta, skip_special_tokens=True)
                s_text = tokenizer.decode(sa, skip_special_tokens=True)
                trial = {k: v for k, v in asdict(p).items() if k != "ids"}
                trials.append(
                    {
                        **trial,
                        "prompt_tokens": len(p.ids),
                        "answer_tokens": n_new,
                        "teacher": t_text,
                        "student": s_text,
                        "teacher_right": is_found(p, t_text),
                        "student_right": is_found(p, s_text),
                    }
                )
            report["trials"] += trials
            report["cells"] += _cells(trials)
            said.append(
                f"{task} teacher {sum(t['teacher_right'] for t in trials)}, student "
                f"{sum(t['student_right'] for t in trials)} of {len(trials)}"
            )
        report["seconds"]["teacher"] += secs[0]
        report["seconds"]["student"] += secs[1]
        if said:
            log(
                f"long context {length} tokens: {'; '.join(said)} (teacher {secs[0]:.0f} s, student {secs[1]:.0f} s)"
            )
    if ppl_rows:
        t0 = time.perf_counter()
        rows = long_text_ids(tokenizer, max(lengths), ppl_rows).to(student.device)
        report["position_ppl"] = {
            "text": "held-out python-docs sections in order (distill/long_eval.py)",
            "rows": rows.shape[0],
            "row_tokens": rows.shape[1],
            "buckets": position_report(student, teacher, rows),
        }
        report["seconds"]["position_ppl"] = time.perf_counter() - t0
        log(
            f"long context: perplexity by position on {rows.shape[0]} x {rows.shape[1]} tokens "
            f"({report['seconds']['position_ppl']:.0f} s)"
        )
    return report


def _cells(trials: list[dict]) -> list[dict]:
    """Trials of one length -> one row per (task, depth): trials, teacher_right, student_right."""
    cells: dict[tuple, dict] = {}
    for t in trials:
        c = cells.setdefault(
            (t["task"], t["depth"]),
            {
                "task": t["task"],
                "length": t["length"],
                "depth": t["depth"],
                "answer_tokens": t["answer_tokens"],
                "trials": 0,
                "teacher_right": 0,
                "student_right": 0,
            },
        )
        c["trials"] += 1
        c["teacher_right"] += t["teacher_right"]
        c["student_right"] += t["student_right"]
    return list(cells.values())


def tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report as (title, header, rows) tables, for the CLI (rich) and bench/bench_long.py (Markdown): retrieval
    by task and length x depth ("teacher / student right, of trials"), then perplexity by position."""
    out = []
    if report["cells"]:
        depths = report["depths"]
        rows = []
        for task in TASKS:
            for length in report["lengths"]:
                cells = {
                    c["depth"]: c for c in report["cells"] if c["task"] == task and c["length"] == length
                }
                if cells:
                    rows.append(
                        [task, str(length), *(_cell(cells[d]) for d in depths), _cell(_sum(cells.values()))]
                    )
        header = ["task", "length", *(f"depth {d:.0%}" for d in depths), "all depths"]
        out.append(("long context: teacher / student right, of trials (greedy, chat template)", header, rows))
    pp = report.get("position_ppl")
    if not pp:
        return out
    rows = [
        [
            f"{_k(b['lo'])}-{_k(b['hi'])}",
            str(b["tokens"]),
            f"{b['teacher_ppl']:.2f}",
            f"{b['student_ppl']:.2f}",
            f"{b['ratio']:.2f}",
        ]
        for b in pp["buckets"]
    ]
    out.append(
        (
            f"perplexity by position ({pp['rows']} x {pp['row_tokens']} tokens of held-out text)",
            ["tokens of context", "targets", "teacher ppl", "student ppl", "student / teacher"],
            rows,
        )
    )
    return out


def _sum(cells) -> dict:
    return {k: sum(c[k] for c in cells) for k in ("trials", "teacher_right", "student_right")}


def _cell(c: dict) -> str:
    return f"{c['teacher_right']} / {c['student_right']} of {c['trials']}"


def _k(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
