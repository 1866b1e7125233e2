"""Streaming distillation data (`--stream`): documents read lazily from large JSONL/Parquet files or a Hugging Face
dataset in streaming mode, tokenized and packed on the fly into rows of seq_len tokens, with a position that the
resume checkpoint saves and restores exactly.

The stream does not depend on the number of processes N:
- after the held-out documents (the first 10% of the first 640, at most 64), the training documents are cut into
  S virtual shards (`--stream-shards`, default 8): contiguous byte ranges of the JSONL files (a line belongs to
  the range its first byte is in), contiguous row ranges of the Parquet files or of an in-memory document list,
  every S-th row of a Hugging Face dataset (whose length a stream does not know);
- each shard is packed on its own (documents joined with EOS as in data.pack, cut into rows) and starts over at
  its end (the next epoch);
- global row k is row k // S of shard k % S, and global batch m is rows m B ... (m + 1) B - 1.
Rank r takes rows r, r + N, ... of each global batch (DistContext.rows); when N divides S and B these all come
from the shards j with j % N == r, so each rank opens, reads and tokenizes only its own shards. A shard's
position is (epoch, address of the current document, tokens of it already used, rows produced): the checkpoint
gathers all S of them, so a run resumes on any N that divides S and reads the batches an uninterrupted run reads.
Rows come in file order (no shuffling): shuffle the files beforehand if their order is not random.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from llamba.distill.data import (
    HELDOUT_FRACTION,
    DataError,
    doc_tokens,
    hf_streaming_dataset,
    hf_text,
    is_hub_name,
    jsonl_text,
    load_documents,
    parquet_file,
    parquet_texts,
)

HELDOUT_SCAN = 640  # the held-out split is 10% of the first HELDOUT_SCAN documents
JSONL_SUFFIXES = (".jsonl", ".json")


def _n_heldout(n_scanned: int) -> int:
    return max(1, round(HELDOUT_FRACTION * n_scanned)) if n_scanned > 1 else 0


# --------------------------------------------------------------------------------------------------
# Sources: documents by address, split into shards
# --------------------------------------------------------------------------------------------------
class _RangedSource:
    """Documents at integer addresses in [0, span); shard j of S is a contiguous address range of the training
    part [train_start, span). Subclasses implement `read(lo, hi)` -> (address, text) of the documents in [lo, hi)."""

    span: int

    def read(self, lo: int, hi: int) -> Iterator[tuple[int, str]]:
        raise NotImplementedError

    def _split_heldout(self) -> None:
        first = []
        for addr, text in self.read(0, self.span):
            first.append((addr, text))
            if len(first) > HELDOUT_SCAN:
                break
        n_held = _n_heldout(min(len(first), HELDOUT_SCAN))
        self.heldout = [text for _, text in first[:n_held]]
        self.train_start = first[n_held][0] if len(first) > n_held else self.span

    def docs(self, shard: int, n_shards: int, addr: int | None = None) -> Iterator[tuple[int, str]]:
        """The documents of `shard` from address `addr` (None: the shard's first) to the shard's end."""
        width = self.span - self.train_start
        lo = self.train_start + width * shard // n_shards
        hi = self.train_start + width * (shard + 1) // n_shards
        return self.read(lo if addr is None else addr, hi)


class ListSource(_RangedSource):
    """An in-memory document list (the default corpus, teacher samples, text files): address = index."""

    def __init__(self, docs: list[str]):
        self._docs, self.span = docs, len(docs)
        self._split_heldout()

    def read(self, lo, hi):
        for i in range(lo, min(hi, self.span)):
            yield i, self._docs[i]


class JsonlSource(_RangedSource):
    """JSONL files read as one byte string in sorted file order: address = byte offset of a line."""

    def __init__(self, files: list[Path], field: str):
        self.files, self.field = files, field
        sizes = [f.stat().st_size for f in files]
        self.starts = [sum(sizes[:i]) for i in range(len(files))]
        self.span = sum(sizes)
        self._split_heldout()

    def read(self, lo, hi):
        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        while i < len(self.files) and lo < hi:
            with open(self.files[i], "rb") as f:
                offset = lo - self.starts[i]
                if offset > 0:  # the first line that starts at or after lo
                    f.seek(offset - 1)
                    offset += len(f.readline()) - 1
                while self.starts[i] + offset < hi:
                    line = f.readline()
                    if not line:
                        break
                    text = jsonl_text(line, f"{self.files[i]} (byte {offset})", self.field)
                    if text and text.strip():
                        yield self.starts[i] + offset, text
                    offset += len(line)
            i += 1
            lo = self.starts[i] if i < len(self.files) else hi


class ParquetSource(_RangedSource):
    """Parquet files in sorted order: address = row index over all files; one row group in memory at a time."""

    def __init__(self, files: list[Path], field: str):
        self.files, self.field = files, field
        self.groups = []  # (first row, file index, row group index) in row order
        row = 0
        for i, f in enumerate(files):
            meta = parquet_file(f, field).metadata
            for g in range(meta.num_row_groups):
                self.groups.append((row, i, g))
                row += meta.row_group(g).num_rows
        self.span = row
        self._firsts = [g[0] for g in self.groups]
        self._split_heldout()

    def read(self, lo, hi):
        k = max(0, bisect.bisect_right(self._firsts, lo) - 1)
        for first, i, g in self.groups[k:]:
            if first >= hi:
                break
            column = parquet_file(self.files[i], self.field).read_row_group(g, columns=[self.field]).column(0)
            for row, x in parquet_texts(column.to_pylist(), self.files[i], self.field, first):
                if lo <= row < hi and x.strip():
                    yield row, x


class HFSource:
    """A Hugging Face dataset in streaming mode: address = row index; shard j of S = every S-th training row (each
    rank reads the rows of the other shards too, but tokenizes only its own)."""

    def __init__(self, name: str, field: str):
        self.name, self.field = name, field
        self._ds = hf_streaming_dataset(name)
        first = [text for _, text in zip(range(HELDOUT_SCAN), self._rows(0), strict=False)]
        n_held = _n_heldout(len(first))
        self.heldout = [t for t in first[:n_held] if t.strip()]
        self.train_start = n_held

    def _rows(self, start: int) -> Iterator[str]:
        ds = self._ds.skip(start) if start else self._ds
        for index, row in enumerate(ds, start):
            yield hf_text(row, self.name, self.field, index)

    def docs(self, shard: int, n_shards: int, addr: int | None = None) -> Iterator[tuple[int, str]]:
        start = self.train_start + shard if addr is None else addr
        for i, text in enumerate(self._rows(start), start):
            if (i - self.train_start) % n_shards == shard and text.strip():
                yield i, text


def _data_files(path: Path) -> tuple[list[Path], str]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (*JSONL_SUFFIXES, ".parquet"))
    kinds = {"parquet" if p.suffix == ".parquet" else "jsonl" for p in files}
    if len(kinds) > 1:
        raise DataError(f"{path}: holds both JSONL and Parquet files; --stream reads a directory of one kind")
    return files, kinds.pop() if kinds else ""


def open_source(
    spec: str | None, text_field: str = "text", teacher=None, tokenizer=None, docs: list[str] | None = None
):
    """`--data` as a streaming source: JSONL/Parquet files (or a directory of one kind) and Hugging Face dataset
    names are read lazily; everything else (the default corpus, teacher samples, text files) or `docs` is a list
    in memory, streamed with the same rules."""
    if docs is not None:
        return ListSource(docs)
    path = Path(spec) if spec else None
    if path is not None and path.is_file() and path.suffix in JSONL_SUFFIXES:
        return JsonlSource([path], text_field)
    if path is not None and path.is_file() and path.suffix == ".parquet":
        return ParquetSource([path], text_field)
    if path is not None and path.is_dir():
        files, kind = _data_files(path)
        if kind:
            return (JsonlSource if kind == "jsonl" else ParquetSource)(files, text_field)
    if spec and spec not in ("default", "none") and not spec.startswith("teacher") and is_hub_name(spec):
        return HFSource(spec, text_field)
    return ListSource(load_documents(spec, text_field, teacher, tokenizer))


# --------------------------------------------------------------------------------------------------
# Packing and the rank's rows
# --------------------------------------------------------------------------------------------------
class _ShardPacker:
    """One shard packed into rows of seq_len tokens; its position is (epoch, addr, skip, rows): the document at
    `addr` has had its first `skip` tokens used, and `rows` rows were produced."""

    def __init__(self, source, shard: int, n_shards: int, tokenizer, seq_len: int):
        self.source, self.shard, self.n_shards = source, shard, n_shards
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.epoch, self.addr, self.skip, self.rows = 0, None, 0, 0
        self._docs: Iterator[tuple[int, str]] | None = None
        self._tokens: list[int] = []

    def state(self) -> dict:
        return {"epoch": self.epoch, "addr": self.addr, "skip": self.skip, "rows": self.rows}

    def restore(self, state: dict) -> None:
        self.epoch, self.addr, self.skip, self.rows = (
            state["epoch"],
            state["addr"],
            state["skip"],
            state["rows"],
        )
        self._docs, self._tokens = None, []

    def _next_doc(self) -> None:
        if self._docs is None and self.addr is not None:  # resumed: re-read the document at addr
            self._docs = self.source.docs(self.shard, self.n_shards, self.addr)
            item = next(self._docs, None)
            if item is None or item[0] != self.addr:
                raise DataError(
                    f"stream shard {self.shard}: no document at address {self.addr} any more; the data "
                    "changed since the checkpoint (restore it, or start a new --out)"
                )
            self._tokens = doc_tokens(self.tokenizer, item[1])
            return
        if self._docs is not None:
            item = next(self._docs, None)
            if item is not None:
                self.addr, self._tokens, self.skip = item[0], doc_tokens(self.tokenizer, item[1]), 0
                return
            self.epoch += 1
        self._docs = self.source.docs(self.shard, self.n_shards)
        item = next(self._docs, None)
        if item is None:
            raise DataError(
                f"stream shard {self.shard} of {self.n_shards} holds no documents; "
                "use fewer --stream-shards or more data"
            )
        self.addr, self._tokens, self.skip = item[0], doc_tokens(self.tokenizer, item[1]), 0

    def next_row(self) -> list[int]:
        row: list[int] = []
        while len(row) < self.seq_len:
            if self._docs is None or self.skip >= len(self._tokens):
                self._next_doc()
                continue
            take = self._tokens[self.skip : self.skip + self.seq_len - len(row)]
            row += take
            self.skip += len(take)
        self.rows += 1
        return row


class TokenStream:
    """The streaming counterpart of data.TokenData for the training loop: `local_batch` gives this rank's rows of
    global batch `index` (batches must be read in order, 0, 1, 2, ...); `position`/`restore` save and restore the
    place in the stream (a JSON string, stored in the resume checkpoint)."""

    def __init__(self, source, tokenizer, seq_len: int, n_shards: int = 8):
        self.source, self.tokenizer, self.seq_len, self.n_shards = source, tokenizer, seq_len, n_shards
        self.heldout = source.heldout
        self.rows = 0  # global rows consumed (all ranks)
        self._packers: dict[int, _ShardPacker] | None = None
        self._saved: dict[str, dict] = {}

    def _open(self, ctx) -> dict[int, _ShardPacker]:
        if self._packers is None:
            if self.n_shards % ctx.world_size:
                raise DataError(
                    f"--stream-shards {self.n_shards} is not divisible by the {ctx.world_size} processes; "
                    "a stream resumes on any number of processes that divides its shard count"
                )
            self._packers = {}
            for j in range(ctx.rank, self.n_shards, ctx.world_size):
                self._packers[j] = _ShardPacker(self.source, j, self.n_shards, self.tokenizer, self.seq_len)
                if str(j) in self._saved:
                    self._packers[j].restore(self._saved[str(j)])
        return self._packers

    def local_batch(self, index: int, batch_size: int, seed: int, ctx) -> torch.Tensor:
        """This rank's rows (b / N, l) of global batch `index` (seed unused: the stream is read in order)."""
        packers = self._open(ctx)
        start = index * batch_size
        if start != self.rows:
            raise DataError(
                f"the stream is at row {self.rows} but batch {index} starts at row {start}; "
                "a stream is read in order from its checkpointed position"
            )
        out = []
        for k in range(start, start + batch_size)[ctx.rows(batch_size)]:
            packer = packers[k % self.n_shards]
            assert packer.rows == k // self.n_shards, (k, packer.rows)
            out.append(packer.next_row())
        self.rows += batch_size
        return torch.tensor(out, dtype=torch.long)

    def shard_states(self, ctx) -> dict[str, dict]:
        """The positions of this rank's shards."""
        return {str(j): p.state() for j, p in self._open(ctx).items()}

    def position(self, ctx) -> str:
        """Every shard's position (gathered from all ranks: a collective) and the global row count, as JSON."""
        shards = {k: v for part in ctx.all_gather_object(self.shard_states(ctx)) for k, v in part.items()}
        return json.dumps({"rows": self.rows, "seq_len": self.seq_len, "shards": shards}, sort_keys=True)

    def restore(self, position: str) -> None:
        state = json.loads(position)
        if state["seq_len"] != self.seq_len or len(state["shards"]) != self.n_shards:
            raise DataError("the checkpointed stream position was saved with other --seq-len/--stream-shards")
        self.rows, self._saved, self._packers = state["rows"], state["shards"], None
