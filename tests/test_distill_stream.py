"""Streaming data (distill/stream.py): the sources read every training document once, in order; ranks read
disjoint shards and their rows rebuild the global batch of one process; a saved position resumes exactly, on the
same or another number of processes."""

import json
import sys
import types

import pytest
import torch
from conftest import tiny_corpus, tiny_tokenizer

from llamba.distill.data import DataError, pack
from llamba.distill.distributed import DistContext
from llamba.distill.stream import JsonlSource, ListSource, ParquetSource, TokenStream, open_source

DOCS = tiny_corpus(
    n_docs=30, words_per_doc=20, seed=1
)  # 27 training documents of 21 tokens: ~9 batches/epoch


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def sources(tmp_path):
    """The same documents as a list, as two JSONL files (with a blank line) and as Parquet with 4-row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [json.dumps({"text": d}) + "\n" for d in DOCS]
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_text("".join(lines[:13]) + "\n")
    (tmp_path / "j" / "b.jsonl").write_text("".join(lines[13:]))
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "c.parquet", row_group_size=4)
    return {
        "list": ListSource(DOCS),
        "jsonl": open_source(str(tmp_path / "j")),
        "parquet": open_source(str(tmp_path / "c.parquet")),
    }


def read(stream, ctx, first, n, batch_size=4):
    return [stream.local_batch(i, batch_size, 0, ctx) for i in range(first, first + n)]


def ranks(world):
    return [DistContext(rank=r, world_size=world) for r in range(world)]


def position(streams, ctxs, monkeypatch):
    """What `position` returns when every rank calls it (one process plays all ranks of the all_gather)."""
    parts = [s.shard_states(c) for s, c in zip(streams, ctxs, strict=True)]
    with monkeypatch.context() as m:
        m.setattr(DistContext, "all_gather_object", lambda self, obj: parts)
        return streams[0].position(ctxs[0])


@pytest.mark.parametrize("kind", ["list", "jsonl", "parquet"])
def test_sources_hold_out_the_first_documents_and_read_the_rest_once(sources, kind):
    src = sources[kind]
    assert isinstance(src, {"list": ListSource, "jsonl": JsonlSource, "parquet": ParquetSource}[kind])
    assert src.heldout == DOCS[:3]
    for n_shards in (1, 4, 5):
        shards = [[text for _, text in src.docs(j, n_shards)] for j in range(n_shards)]
        assert all(shards) and sum(shards, []) == DOCS[3:], n_shards  # disjoint, complete, in order


def test_one_shard_packs_like_the_in_memory_packer(sources, tok):
    rows = torch.cat(read(TokenStream(sources["jsonl"], tok, 16, n_shards=1), DistContext(), 0, 8))
    assert torch.equal(rows, pack(tok, DOCS[3:], 16)[:32])


@pytest.mark.parametrize("kind", ["list", "jsonl", "parquet"])
def test_ranks_read_disjoint_shards_and_rebuild_the_global_batch(sources, tok, kind):
    one = read(TokenStream(sources[kind], tok, 16, n_shards=4), DistContext(), 0, 12)  # wraps into epoch 1
    streams = [TokenStream(sources[kind], tok, 16, n_shards=4) for _ in range(2)]
    parts = [read(s, c, 0, 12) for s, c in zip(streams, ranks(2), strict=True)]
    for step, batch in enumerate(one):
        assert batch.shape == (4, 16) and parts[0][step].shape == (2, 16)
        assert torch.equal(batch[0::2], parts[0][step]) and torch.equal(batch[1::2], parts[1][step])
    opened = [set(s.shard_states(c)) for s, c in zip(streams, ranks(2), strict=True)]
    assert opened == [{"0", "2"}, {"1", "3"}]
    assert max(st["epoch"] for st in streams[0].shard_states(ranks(2)[0]).values()) >= 1


@pytest.mark.parametrize("before,after", [(1, 1), (2, 1), (1, 2)])
def test_position_resumes_exactly_on_any_world_size(sources, tok, monkeypatch, before, after):
    src = sources["jsonl"]
    whole = read(TokenStream(src, tok, 16, n_shards=4), DistContext(), 0, 11)
    first = [TokenStream(src, tok, 16, n_shards=4) for _ in range(before)]
    for s, c in zip(first, ranks(before), strict=True):
        read(s, c, 0, 5)
    saved = position(first, ranks(before), monkeypatch)
    resumed = [TokenStream(open_source(str(src.files[0].parent)), tok, 16, n_shards=4) for _ in range(after)]
    parts = []
    for s, c in zip(resumed, ranks(after), strict=True):
        s.restore(saved)
        parts.append(read(s, c, 5, 6))
    for i, batch in enumerate(whole[5:]):
        for r in range(after):
            assert torch.equal(batch[r::after], parts[r][i]), (i, r)


def test_stream_errors_are_one_line(sources, tok, tmp_path):
    stream = TokenStream(sources["list"], tok, 16, n_shards=3)
    with pytest.raises(DataError, match="--stream-shards 3 is not divisible by the 2 processes"):
        stream.local_batch(0, 4, 0, DistContext(rank=0, world_size=2))
    with pytest.raises(DataError, match="batch 2 starts at row 8"):
        TokenStream(sources["list"], tok, 16).local_batch(2, 4, 0, DistContext())
    tiny = TokenStream(ListSource(DOCS[:4]), tok, 16, n_shards=8)
    with pytest.raises(DataError, match="shard 0 of 8 holds no documents; use fewer --stream-shards"):
        tiny.local_batch(0, 8, 0, DistContext())
    with pytest.raises(DataError, match="not found"):
        open_source(str(tmp_path / "missing.jsonl"))


def test_hugging_face_streaming_dataset(monkeypatch, tok):
    """`datasets` is not installed here: a stand-in with the streaming API we use (iteration, skip)."""

    class Streaming:
        def __init__(self, rows):
            self.rows = rows

        def skip(self, n):
            return Streaming(self.rows[n:])

        def __iter__(self):
            return iter(self.rows)

    rows = [{"text": d} for d in DOCS]
    monkeypatch.setitem(
        sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: Streaming(rows))
    )
    src = open_source("someone/corpus")
    assert src.heldout == DOCS[:3]
    assert sorted(sum([[t for _, t in src.docs(j, 4)] for j in range(4)], []), key=DOCS.index) == DOCS[3:]
    whole = read(TokenStream(src, tok, 16, n_shards=4), DistContext(), 0, 6)
    part = TokenStream(src, tok, 16, n_shards=4)
    read(part, DistContext(), 0, 2)
    again = TokenStream(open_source("someone/corpus"), tok, 16, n_shards=4)
    again.restore(part.position(DistContext()))
    assert all(torch.equal(a, b) for a, b in zip(whole[2:], read(again, DistContext(), 2, 4), strict=True))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="pip install datasets"):
        open_source("someone/corpus")
