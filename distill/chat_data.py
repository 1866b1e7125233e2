"""Chat data from the teacher itself: conversations rendered with its chat template, every special token kept.

Sequence-level distillation of an Instruct teacher on its own answers is what keeps chat behaviour (facts and
references in the README's "Chat-faithful distillation"); pretraining-style text alone does not.

    sample_answers     a batched KV-cache sampler over the teacher (left padding, one generator per row, so
                       record i is the same whatever batch it was sampled in)
    teacher_chat       N conversations (prompts from distill/chat_prompts.py, 1-2 user turns), cached on disk
                       keyed by the teacher's weights and the settings; resumable (a killed run keeps every
                       finished batch); a file made on a GPU box is found on a CPU one (the key rounds the
                       weights to bf16, so an fp32 and a bf16 copy of one teacher share it)
    render             one conversation -> the training text: the chat template, system prompt included
    assistant_mask     which positions of packed token rows are assistant tokens (stage 3's loss mask)

A pre-generated file for the embedded teacher ships in distill/chat/ (built by `llamba distill chat-data`,
see the README); `teacher_chat` reads it when its key matches, so the demo spends no time sampling.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llamba.chat import prompt_ids
from llamba.distill.teacher import cache_root
from llamba.errors import DataError
from llamba.generate import SamplingParams, process_logits

CHAT_FORMAT = 1  # bump when the record layout or the prompt sets change what a key means
SHIPPED_DIR = Path(__file__).parent / "chat"


class ChatDataError(DataError):
    """A chat corpus that cannot be built or read."""


@dataclass(frozen=True)
class ChatSettings:
    """What a cached corpus depends on besides the teacher (part of its file name's key)."""

    n: int = 768
    seed: int = 0
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256  # the chat report's limit too: kept answers end within it
    # "train" (distill/chat_prompts.train_conversations), "open-eval" or "fact-eval"
    prompt_set: str = "train"

    def key(self, fingerprint: str) -> str:
        """Hash of the teacher, the sampling settings and the prompts (the first 64 conversations' user turns), not
        of n: a longer corpus extends a shorter one."""
        prompts = user_turns(ChatSettings(**{**asdict(self), "n": 64}))
        spec = json.dumps(
            {**asdict(self), "n": None, "format": CHAT_FORMAT, "teacher": fingerprint, "prompts": prompts},
            sort_keys=True,
        )
        return hashlib.sha1(spec.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# The teacher's identity and the chat template
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_fingerprint(model) -> str:
    """A short hash of the teacher's architecture and weights (rounded to bf16, so the fp32 and the bf16 copy of
    one teacher agree; the embedding, the first and the last layer: enough to tell two checkpoints apart)."""
    cfg = model.config.to_dict()
    arch = {
        k: cfg.get(k)
        for k in (
            "model_type",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "vocab_size",
            "rope_theta",
        )
    }
    h = hashlib.sha1(json.dumps(arch, sort_keys=True).encode())
    layers = model.model.layers
    for t in (
        model.model.embed_tokens.weight,
        layers[0].self_attn.q_proj.weight,
        layers[-1].mlp.down_proj.weight,
        model.model.norm.weight,
    ):
        h.update(t.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages: list[dict]) -> str:
    """A whole conversation as training text (system prompt, every turn and its end-of-turn marker), without the
    template's trailing newline: the packer joins documents with EOS, which the text then already ends with."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return text[:-1] if text.endswith("\n") else text


@dataclass(frozen=True)
class ChatMarkers:
    """Token ids that delimit an assistant turn: `start` + `header` opens it, `end` closes it (end included)."""

    start: int
    header: tuple[int, ...]
    end: int

    @classmethod
    def of(cls, tokenizer) -> ChatMarkers | None:
        """The markers of a ChatML-style template (<|im_start|>assistant\\n ... <|im_end|>), None otherwise."""
        vocab = tokenizer.get_vocab()
        if "<|im_start|>" not in vocab or "<|im_end|>" not in vocab:
            return None
        header = tuple(tokenizer("assistant\n", add_special_tokens=False)["input_ids"])
        return cls(vocab["<|im_start|>"], header, vocab["<|im_end|>"])


def assistant_mask(ids: torch.Tensor, markers: ChatMarkers | None) -> torch.Tensor:
    """ids: (b, l) packed rows -> bool (b, l): True where the token is the content of an assistant turn or the
    marker that closes it. A row with no chat markers at all (plain text) is all True; tokens before a row's first
    marker belong to a turn cut by the packer whose role is unknown, and count as assistant tokens when that turn
    closes with the end marker (most of a conversation's tokens are the answer's)."""
    if markers is None:
        return torch.ones_like(ids, dtype=torch.bool)
    b, l = ids.shape
    mask = torch.zeros(b, l, dtype=torch.bool)
    rows = ids.tolist()
    k = len(markers.header)
    for r, row in enumerate(rows):
        if markers.start not in row and markers.end not in row:
            mask[r] = True
            continue
        inside = markers.start not in row[: row.index(markers.end)] if markers.end in row else False
        i = 0
        while i < l:
            tok = row[i]
            if tok == markers.start:
                inside = tuple(row[i + 1 : i + 1 + k]) == markers.header
                i += 1 + k if inside else 1
                continue
            if inside:
                mask[r, i] = True
                if tok == markers.end:
                    inside = False
            i += 1
    return mask.to(ids.device)


# --------------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_answers(
    model,
    prompts: list[list[int]],
    seeds: list[int],
    params: SamplingParams,
    eos_ids: tuple[int, ...],
    pad_id: int,
    batch_size: int = 16,
) -> list[tuple[list[int], bool]]:
    """prompts: token ids per row; seeds: one per row -> per row (answer ids, ended with an EOS id). The EOS is not
    included in the ids. Rows are batched by length (left padding, position ids from the mask); each row draws
    from its own generator, so a row's answer does not depend on its batch (up to float rounding)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[tuple[list[int], bool] | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = _sample_batch(
            model, [prompts[i] for i in idx], [seeds[i] for i in idx], params, eos_ids, pad_id, device
        )
        for i, row in zip(idx, rows, strict=True):
            out[i] = row
    return out  # type: ignore[return-value]


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, attention mask), both (b, longest), padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def record_tokens(live: list[int], tokens: list[int], stop, answers, ended) -> list[int]:
    """One decode step of a shrinking batch: row live[j] drew tokens[j]; a stop token ends its answer, any other
    is appended. -> the batch positions j of the rows still going (both samplers compact their state with it)."""
    keep = []
    for j, (r, tok) in enumerate(zip(live, tokens, strict=True)):
        if tok in stop:
            ended[r] = True
        else:
            answers[r].append(tok)
            keep.append(j)
    return keep


def _sample_batch(model, prompts, seeds, params: SamplingParams, eos_ids, pad_id, device):
    """One left-padded batch; rows that finish leave the batch (their KV cache rows are dropped)."""
    from transformers import DynamicCache

    b = len(prompts)
    ids, mask = left_pad(prompts, pad_id, device)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache()
    # only the last position is read (the whole (b, l, vocab) logits: 1.6 GB per row at 8k tokens)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1
    ).logits[:, -1]
    answers: list[list[int]] = [[] for _ in range(b)]
    ended = [False] * b
    live = list(range(b))  # original row of each batch row
    eos = set(eos_ids)
    next_pos = pos[:, -1:] + 1
    for _ in range(params.max_new_tokens):
        logp = process_logits(logits.float().cpu(), params)
        if params.temperature == 0:
            tokens = logp.argmax(-1).tolist()
        else:
            probs = logp.exp()
            tokens = [int(torch.multinomial(probs[j], 1, generator=gens[r])) for j, r in enumerate(live)]
        keep = record_tokens(live, tokens, eos, answers, ended)
        if not keep or len(answers[live[keep[0]]]) >= params.max_new_tokens:
            break
        if len(keep) < len(live):
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            mask, next_pos = mask[sel], next_pos[sel]
            live, tokens = [live[j] for j in keep], [tokens[j] for j in keep]
        step = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        mask = torch.cat([mask, torch.ones(len(live), 1, dtype=mask.dtype, device=device)], dim=1)
        logits = model(
            input_ids=step, attention_mask=mask, position_ids=next_pos, cache=cache, use_cache=True
        ).logits[:, -1]
        next_pos = next_pos + 1
    return [(a, e) for a, e in zip(answers, ended, strict=True)]


# --------------------------------------------------------------------------------------------------
# The corpus: N conversations, cached and resumable
# --------------------------------------------------------------------------------------------------
def row_seed(seed: int, index: int, turn: int) -> int:
    return (seed * 1_000_003 + index * 101 + turn) % (2**63 - 1)


def user_turns(settings: ChatSettings) -> list[list[str]]:
    from llamba.distill import chat_prompts

    if settings.prompt_set == "train":
        return chat_prompts.train_conversations(settings.n, settings.seed)
    if settings.prompt_set == "open-eval":
        return [[p] for p in chat_prompts.OPEN_EVAL][: settings.n]
    if settings.prompt_set == "fact-eval":
        return [[q] for q, _ in chat_prompts.FACT_EVAL][: settings.n]
    raise ChatDataError(f"unknown prompt set {settings.prompt_set!r} (train, open-eval, fact-eval)")


def generate_records(
    model, tokenizer, settings: ChatSettings, first: int, last: int, batch_size: int = 16
) -> list[dict]:
    """Conversations first..last-1 of the prompt set, every turn answered by the teacher. A conversation whose
    answer hit max_new_tokens stops at that turn (its record says `ended: false`)."""
    from llamba.generate import chat_stop_ids

    turns = user_turns(settings)[first:last]
    params = SamplingParams(
        temperature=settings.temperature, top_p=settings.top_p, max_new_tokens=settings.max_new_tokens
    )
    eos = chat_stop_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    convs: list[list[dict]] = [[] for _ in turns]
    ended = [True] * len(turns)
    depth = max((len(t) for t in turns), default=0)
    for turn in range(depth):
        live = [i for i, t in enumerate(turns) if turn < len(t) and ended[i]]
        for i in live:
            convs[i].append({"role": "user", "content": turns[i][turn]})
        rows = sample_answers(
            model,
            [prompt_ids(tokenizer, convs[i]) for i in live],
            [row_seed(settings.seed, first + i, turn) for i in live],
            params,
            eos,
            pad,
            batch_size,
        )
        for i, (answer, ok) in zip(live, rows, strict=True):
            convs[i].append(
                {"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=False)}
            )
            ended[i] = ok
    return [
        {"id": first + i, "messages": c, "ended": e}
        for i, (c, e) in enumerate(zip(convs, ended, strict=True))
    ]


def corpus_path(fingerprint: str, settings: ChatSettings) -> Path:
    return cache_root() / "data" / f"chat-{settings.prompt_set}-{settings.key(fingerprint)}.jsonl"


def shipped_path(fingerprint: str, settings: ChatSettings) -> Path:
    return SHIPPED_DIR / f"chat-{settings.prompt_set}-{settings.key(fingerprint)}.jsonl"


def read_records(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if n == 1 or not line.endswith("\n"):  # a write cut by a kill: the last line only
                    break
                raise ChatDataError(
                    f"{path}:{n}: not valid JSON; delete the file to sample it again"
                ) from None
            records.append(rec)
    return records


def teacher_chat(
    model, tokenizer, settings: ChatSettings = ChatSettings(), batch_size: int = 16, log=print
) -> list[dict]:
    """The first `settings.n` conversation records for this teacher: from the shipped file or the cache when they
    hold enough, else sampled (appending each finished batch to the cache file, so a killed run resumes)."""
    if not has_chat_template(tokenizer):
        raise ChatDataError(
            "the teacher's tokenizer has no chat template; chat data needs an Instruct teacher "
            "(or pass --data with your own text)"
        )
    fp = teacher_fingerprint(model)
    for path in (shipped_path(fp, settings), corpus_path(fp, settings)):
        if path.is_file():
            have = read_records(path)
            if len(have) >= settings.n:
                return have[: settings.n]
    path = corpus_path(fp, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    have = read_records(path) if path.is_file() else []
    if len(have) < settings.n:
        log(
            f"chat data: sampling {settings.n - len(have)} conversations from the teacher into {path} "
            f"(T={settings.temperature}, top-p {settings.top_p}; resumable, {len(have)} already there)"
        )
    t0, n_tok = time.perf_counter(), 0
    chunk = batch_size * 4
    if path.is_file():  # drop a line cut by an earlier kill (the records before it stay on disk as they are)
        raw = path.read_bytes()
        os.truncate(path, raw.rfind(b"\n") + 1)
    with open(path, "a", encoding="utf-8") as f:
        while len(have) < settings.n:
            new = generate_records(
                model, tokenizer, settings, len(have), min(settings.n, len(have) + chunk), batch_size
            )
            f.writelines(json.dumps(r) + "\n" for r in new)
            f.flush()
            os.fsync(f.fileno())
            have.extend(new)
            n_tok += sum(
                len(tokenizer(m["content"], add_special_tokens=False)["input_ids"])
                for r in new
                for m in r["messages"]
                if m["role"] == "assistant"
            )
            dt = time.perf_counter() - t0
            log(
                f"chat data: {len(have)}/{settings.n} conversations, {n_tok:,} answer tokens in {dt:.0f} s "
                f"({n_tok / max(dt, 1e-9):.0f} tok/s)"
            )
    return have[: settings.n]


def chat_documents(records: list[dict], tokenizer) -> list[str]:
    """Training texts of the records that ended with EOS (a conversation cut at max_new_tokens would teach the
    student to stop answering mid-sentence)."""
    return [render(tokenizer, r["messages"]) for r in records if r.get("ended", True)]
