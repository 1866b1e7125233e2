"""Distillation data: read documents, tokenize with the teacher's tokenizer, pack to a sequence length, and keep a
fixed held-out split.

Sources (`--data`):
    chat[:N] (default)  N conversations (default 768) sampled from the teacher itself with its chat template, every
                        special token kept (distill/chat_data.py); cached on disk, shipped pre-generated for the
                        embedded teacher; `teacher[:N]` is the same
    python-docs         the Python language reference that ships with CPython (`pydoc_data.topics`, ~460k
                        characters of English prose); offline, no download (the default before chat data)
    path.txt | dir/     plain text (a directory: every *.txt / *.md under it, one document per file)
    path.jsonl|.parquet one document per row, from the `text` field (`--text-field`)
    anything else       a Hugging Face dataset name (needs the `datasets` package and the network)

This module reads the whole corpus into memory and packs it once (`TokenData`); `--stream` reads it lazily
instead (distill/stream.py, same tokenization and packing rule).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from llamba.errors import DataError, one_line

HELDOUT_FRACTION = 0.1
SPLIT_SEED = 0  # the held-out split does not depend on the run seed: every run evaluates on the same text

DEFAULT_DATA = "chat"  # what --data means when it is not given


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
    return text_value(row[field], where, field)


def text_value(value, where: str, field: str) -> str:
    """A document's text field must be a string: null or a number would train on 'None' or on digits."""
    if isinstance(value, str):
        return value
    kind = "null" if value is None else type(value).__name__
    raise DataError(
        f"{where}: field {field!r} is {kind}, not text; clean the row or set --text-field to the text column"
    )


def _read_jsonl(path: Path, field: str) -> list[str]:
    n = 0
    try:
        with open(path, encoding="utf-8") as f:
            texts = [jsonl_text(line, f"{path}:{n}", field) for n, line in enumerate(f, 1)]
    except UnicodeDecodeError:
        raise DataError(
            f"{path}:{n + 1}: not UTF-8 text; is it a JSONL file? (convert it to UTF-8)"
        ) from None
    return [t for t in texts if t is not None]


def read_text_file(path: Path) -> str:
    """A plain-text file as a string; DataError for a binary file (NUL bytes: weights, archives, images, whatever
    its suffix) or for text that is not UTF-8."""
    raw = path.read_bytes()
    nul = raw.find(b"\x00", 0, 1 << 16)
    if nul >= 0:
        raise DataError(
            f"{path} is a binary file (NUL byte at offset {nul}), not text; --data takes plain text, "
            "JSONL or Parquet"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); convert it, "
            "e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def parquet_file(path: Path, field: str):
    """A pyarrow ParquetFile whose schema has the text column `field` (DataError naming the fix otherwise)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (`pip install 'llamba[data]'`)") from None
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable Parquet file ({one_line(e)})") from None
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {field!r} among {pf.schema_arrow.names} (set --text-field)")
    kind = pf.schema_arrow.field(field).type
    if not (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or getattr(pa.types, "is_string_view", lambda _: False)(kind)
    ):
        raise DataError(
            f"{path}: column {field!r} has type {kind}, not string; set --text-field to the text column"
        )
    return pf


def parquet_texts(column: list, path: Path, field: str, first_row: int = 0):
    """(row, text) of a Parquet string column's values, refusing nulls by row number."""
    for row, x in enumerate(column, first_row):
        yield row, text_value(x, f"{path} row {row}", field)


def _read_parquet(path: Path, field: str) -> list[str]:
    column = parquet_file(path, field).read(columns=[field]).column(0).to_pylist()
    return [x for _, x in parquet_texts(column, path, field) if x]


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


def hf_text(row: dict, name: str, field: str, index: int | None = None) -> str:
    where = f"dataset {name}" + ("" if index is None else f" row {index}")
    if field not in row:
        raise DataError(f"{where}: no field {field!r} (set --text-field)")
    return text_value(row[field], where, field)


def _read_hf(name: str, field: str, max_docs: int) -> list[str]:
    docs = []
    for index, row in enumerate(hf_streaming_dataset(name)):
        docs.append(hf_text(row, name, field, index))
        if len(docs) >= max_docs:
            break
    return docs


def chat_spec(spec: str | None) -> int | None:
    """The number of conversations a chat-data spec asks for (None: not a chat spec). 'chat' / 'teacher' (and no
    --data at all) mean the default count."""
    from llamba.distill.chat_data import ChatSettings

    if spec in (None, "", "default", "chat", "teacher"):
        return ChatSettings().n
    for prefix in ("chat:", "teacher:"):
        if spec.startswith(prefix):
            n = spec[len(prefix) :]
            if not n.isdigit() or int(n) < 2:
                raise DataError(
                    f"--data {spec}: the number of conversations must be an integer >= 2 "
                    f"(e.g. {prefix}{ChatSettings().n})"
                )
            return int(n)
    return None


def teacher_chat_documents(teacher, tokenizer, n: int) -> list[str]:
    """N conversations sampled from the teacher with its chat template (distill/chat_data.py), as training texts."""
    from llamba.distill.chat_data import ChatSettings, chat_documents, teacher_chat

    if teacher is None or tokenizer is None:
        raise DataError(
            "chat data (the default --data) is sampled from the teacher: pass a teacher and its tokenizer"
        )
    return chat_documents(teacher_chat(teacher, tokenizer, ChatSettings(n=n)), tokenizer)


FILE_SUFFIXES = (
    ".txt",
    ".jsonl",
    ".json",
    ".parquet",
    ".md",
    ".csv",
    ".tsv",
    ".bin",
    ".safetensors",
    ".gguf",
    ".pt",
    ".npz",
    ".arrow",
    ".gz",
    ".zst",
    ".xz",
    ".bz2",
    ".zip",
    ".tar",
)


def is_hub_name(spec: str) -> bool:
    """`--data` that names no local path and reads as a Hugging Face dataset ('name' or 'org/name'). A name with a
    file suffix, or one under a directory that exists here ('data/corpus' with data/ present), is a mistyped path:
    it fails at once instead of after network retries."""
    path = Path(spec)
    return (
        not path.exists()
        and not spec.startswith(("/", ".", "~"))
        and spec.count("/") <= 1
        and path.suffix.lower() not in FILE_SUFFIXES
        and not (spec.count("/") == 1 and path.parent.is_dir())
    )


def load_documents(
    spec: str | None, text_field: str = "text", teacher=None, tokenizer=None, max_docs: int = 100_000
) -> list[str]:
    """Resolve `--data` (see the module docstring) to a list of documents."""
    n_chat = chat_spec(spec)
    if n_chat is not None:
        return teacher_chat_documents(teacher, tokenizer, n_chat)
    if spec == "python-docs":
        return python_docs_corpus()
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            raise DataError(f"{path}: directory holds no .txt or .md files")
        docs = [read_text_file(p) for p in files]
    elif path.is_file():
        if path.suffix in (".jsonl", ".json"):
            docs = _read_jsonl(path, text_field)
        elif path.suffix == ".parquet":
            docs = _read_parquet(path, text_field)
        else:
            docs = [d for d in read_text_file(path).split("\n\n\n") if d.strip()]
    elif is_hub_name(spec):
        docs = _read_hf(spec, text_field, max_docs)
    elif Path(spec).suffix or spec.startswith(("/", ".", "~")):
        raise DataError(f"--data {spec}: file not found")
    else:
        raise DataError(f"--data {spec}: no such file or directory")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"--data {spec}: no text found (the file or directory is empty)")
    if len(docs) == 1:
        docs = split_single_document(docs[0], spec)
    return docs[:max_docs]


def split_single_document(doc: str, spec: str) -> list[str]:
    """A corpus of one document (one JSONL row, or a .txt whose documents are separated by one blank line rather
    than two) has no document to hold out: cut it at blank lines, else at line breaks, else into ten runs of
    words, so the held-out split is about a tenth of the text."""
    for sep in ("\n\n", "\n"):
        parts = [p.strip() for p in doc.split(sep) if p.strip()]
        if len(parts) >= 2:
            return parts
    words = doc.split()
    if len(words) < 2:
        raise DataError(
            f"--data {spec}: a single document of {len(words)} word is too short to hold out a "
            "held-out split; give more text"
        )
    k = min(10, len(words))
    return [" ".join(words[i * len(words) // k : (i + 1) * len(words) // k]) for i in range(k)]


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
    """One document's token ids followed by EOS (unless it already ends with it, as a chat conversation does): how
    every packer joins documents."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


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
