"""Distillation data: read documents, tokenize with the teacher's tokenizer, pack to a sequence length, and keep a
fixed held-out split.

Sources (`--data`):
    default / none      the Python language reference that ships with CPython (`pydoc_data.topics`, ~460k
                        characters of English prose); offline, no download
    teacher[:N]         N samples drawn from the teacher itself from short seed prompts, cached to disk
    path.txt | dir/     plain text (a directory: every *.txt / *.md under it, one document per file)
    path.jsonl|.parquet one document per row, from the `text` field (`--text-field`)
    anything else       a Hugging Face dataset name (needs the `datasets` package and the network)

This module reads the whole corpus into memory and packs it once (`TokenData`); `--stream` reads it lazily
instead (distill/stream.py, same tokenization and packing rule).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from llamba.atomic import atomic_write
from llamba.distill.teacher import cache_root

HELDOUT_FRACTION = 0.1
SPLIT_SEED = 0  # the held-out split does not depend on the run seed: every run evaluates on the same text

SEED_PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how photosynthesis works.",
    "Describe the history of the printing press.",
    "What are the benefits of regular exercise?",
    "Write an essay about the ocean.",
    "Explain what a computer program is to a child.",
    "Describe a busy market in the morning.",
    "How do vaccines work?",
    "Tell me about the Roman Empire.",
    "Write a letter to a friend about a trip to the mountains.",
    "Explain the water cycle.",
    "What makes a good teacher?",
    "Describe how bread is made.",
    "Explain gravity in simple words.",
    "Write a poem about autumn.",
    "Why do we have seasons?",
    "Describe the life of a honeybee.",
    "Explain how a bicycle works.",
    "What is the importance of sleep?",
    "Summarize the plot of a mystery novel.",
]


class DataError(ValueError):
    """Bad `--data`: the one-line message names the file and the field."""


# --------------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------------
def python_docs_corpus() -> list[str]:
    """The CPython language reference topics, cut at blank lines into ~2,000-character documents."""
    import pydoc_data.topics as topics

    docs = []
    for name in sorted(topics.topics):
        buf = ""
        for para in topics.topics[name].split("\n\n"):
            buf = f"{buf}\n\n{para}" if buf else para
            if len(buf) >= 2000:
                docs.append(buf.strip())
                buf = ""
        if buf.strip():
            docs.append(buf.strip())
    return docs


def jsonl_text(line: str | bytes, where: str, field: str) -> str | None:
    """The text of one JSONL line (None for a blank line); `where` names the line in errors."""
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        raise DataError(f"{where}: not valid JSON") from None
    if not isinstance(row, dict) or field not in row:
        raise DataError(f"{where}: no field {field!r} (set --text-field)")
    return str(row[field])


def _read_jsonl(path: Path, field: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        texts = (jsonl_text(line, f"{path}:{n}", field) for n, line in enumerate(f, 1))
        return [t for t in texts if t is not None]


def parquet_file(path: Path, field: str):
    """A pyarrow ParquetFile whose schema has the text column `field` (DataError naming the fix otherwise)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (`pip install 'llamba[data]'`)") from None
    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {field!r} among {pf.schema_arrow.names} (set --text-field)")
    return pf


def _read_parquet(path: Path, field: str) -> list[str]:
    column = parquet_file(path, field).read(columns=[field]).column(0)
    return [str(x) for x in column.to_pylist() if x]


def hf_streaming_dataset(name: str):
    """A Hugging Face dataset's train split in streaming mode (rows are read on demand, nothing is downloaded
    up front); DataError naming `pip install datasets` when the package is missing."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"--data {name!r} is neither a file nor a directory; as a Hugging Face dataset it needs "
            "`pip install datasets` and the network"
        ) from None
    return datasets.load_dataset(name, split="train", streaming=True)


def hf_text(row: dict, name: str, field: str) -> str:
    if field not in row:
        raise DataError(f"dataset {name}: no field {field!r} (set --text-field)")
    return str(row[field] or "")


def _read_hf(name: str, field: str, max_docs: int) -> list[str]:
    docs = []
    for row in hf_streaming_dataset(name):
        docs.append(hf_text(row, name, field))
        if len(docs) >= max_docs:
            break
    return docs


def teacher_samples(
    teacher, tokenizer, n_samples: int = 256, max_new_tokens: int = 192, seed: int = 0, batch_size: int = 16
) -> list[str]:
    """Sample from the teacher (T = 1, top-p 0.95) from short chat prompts; cached on disk by teacher and settings,
    so a second run reads the file (and a GPU box can produce it for a CPU one)."""
    name = getattr(teacher.config, "_name_or_path", "") or type(teacher).__name__
    key = hashlib.sha1(
        f"{name}:{teacher.config.to_json_string()}:{n_samples}:{max_new_tokens}:{seed}".encode()
    )
    path = cache_root() / "data" / f"teacher-{key.hexdigest()[:12]}.jsonl"
    if path.is_file():
        return _read_jsonl(path, "text")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    docs = []
    tokenizer.padding_side = "left"
    for start in range(0, n_samples, batch_size):
        prompts = []
        for k in range(start, min(start + batch_size, n_samples)):
            p = (
                SEED_PROMPTS[int(torch.randint(len(SEED_PROMPTS), (1,), generator=gen))]
                if k >= len(SEED_PROMPTS)
                else SEED_PROMPTS[k]
            )
            msgs = [{"role": "user", "content": p}]
            prompts.append(
                tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                if tokenizer.chat_template
                else p
            )
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = teacher.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_p=0.95,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row in out:
            docs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    atomic_write(path, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


def is_hub_name(spec: str) -> bool:
    """`--data` that names no local path and reads as a Hugging Face dataset ('name' or 'org/name')."""
    return not Path(spec).exists() and not spec.startswith(("/", ".", "~")) and spec.count("/") <= 1 and \
        Path(spec).suffix not in (".txt", ".jsonl", ".json", ".parquet", ".md")


def load_documents(
    spec: str | None, text_field: str = "text", teacher=None, tokenizer=None, max_docs: int = 100_000
) -> list[str]:
    """Resolve `--data` (see the module docstring) to a list of documents."""
    if spec in (None, "", "default", "none"):
        return python_docs_corpus()
    if spec == "teacher" or spec.startswith("teacher:"):
        n = int(spec.split(":", 1)[1]) if ":" in spec else 256
        if teacher is None:
            raise DataError("--data teacher needs a teacher")
        return teacher_samples(teacher, tokenizer, n_samples=n)
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            raise DataError(f"{path}: directory holds no .txt or .md files")
        docs = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    elif path.is_file():
        if path.suffix in (".jsonl", ".json"):
            docs = _read_jsonl(path, text_field)
        elif path.suffix == ".parquet":
            docs = _read_parquet(path, text_field)
        else:
            docs = [
                d for d in path.read_text(encoding="utf-8", errors="replace").split("\n\n\n") if d.strip()
            ]
    elif is_hub_name(spec):
        docs = _read_hf(spec, text_field, max_docs)
    else:
        raise DataError(f"{spec}: file not found")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{spec}: no text found")
    return docs[:max_docs]


# --------------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------------
def split_documents(
    docs: list[str], heldout_fraction: float = HELDOUT_FRACTION
) -> tuple[list[str], list[str]]:
    """A fixed (seed-independent) document-level split -> (train, held-out); at least one held-out document."""
    order = list(range(len(docs)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_held = max(1, int(round(heldout_fraction * len(docs)))) if len(docs) > 1 else 0
    held = [docs[i] for i in order[:n_held]]
    train = [docs[i] for i in order[n_held:]] or held
    return train, held


def doc_tokens(tokenizer, text: str) -> list[int]:
    """One document's token ids followed by EOS: how every packer joins documents."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids


def pack(tokenizer, docs: list[str], seq_len: int) -> torch.Tensor:
    """Tokenize each document, join them with EOS, cut into rows -> (n_rows, seq_len) int64. The tail that does not
    fill a row is dropped (a corpus shorter than one row is repeated)."""
    stream: list[int] = []
    for d in docs:
        stream.extend(doc_tokens(tokenizer, d))
    if not stream:
        raise DataError("the data produced no tokens")
    while len(stream) < seq_len:
        stream = stream + stream
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


@dataclass
class TokenData:
    train: torch.Tensor  # (n_train, l)
    heldout: torch.Tensor  # (n_held, l)

    def batch(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """The `step`-th training batch (b, l): a stateless function of (step, seed), so a resumed run reads the
        same batches as an uninterrupted one. Rows are visited in a fresh permutation every epoch."""
        n = self.train.shape[0]
        idx = []
        for k in range(step * batch_size, (step + 1) * batch_size):
            epoch, pos = divmod(k, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            idx.append(int(perm[pos]))
        return self.train[idx]

    def local_batch(self, index: int, batch_size: int, seed: int, ctx) -> torch.Tensor:
        """This rank's rows (b / N, l) of global batch `index` (ctx: a distill.distributed.DistContext)."""
        return ctx.shard(self.batch(index, batch_size, seed))

    def position(self, ctx) -> str:
        return ""  # stateless: batches are a function of (index, seed)

    def restore(self, position: str) -> None:
        pass


def build_token_data(docs: list[str], tokenizer, seq_len: int) -> TokenData:
    train_docs, held_docs = split_documents(docs)
    return TokenData(train=pack(tokenizer, train_docs, seq_len), heldout=pack(tokenizer, held_docs, seq_len))
