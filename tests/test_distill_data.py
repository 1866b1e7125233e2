import json

import pytest
import torch

from llamba.distill.data import (
    DataError,
    TokenData,
    build_token_data,
    load_documents,
    pack,
    python_docs_corpus,
    split_documents,
)
from llamba.distill.testing import tiny_corpus, tiny_tokenizer


def test_default_corpus_ships_with_python_and_is_prose():
    docs = load_documents(None)
    assert docs == python_docs_corpus()
    assert len(docs) > 100 and sum(map(len, docs)) > 300_000
    assert any("statement" in d for d in docs)


def test_split_is_fixed_and_disjoint():
    docs = [f"doc {i}" for i in range(50)]
    train, held = split_documents(docs)
    assert (train, held) == split_documents(docs)
    assert len(held) == 5 and not set(train) & set(held) and set(train) | set(held) == set(docs)


def test_pack_joins_documents_with_eos_and_cuts_rows():
    tok = tiny_tokenizer()
    rows = pack(tok, ["ba be bi", "bo bu ba"], seq_len=4)  # 3 + eos + 3 + eos = 8 tokens -> 2 rows
    assert rows.shape == (2, 4)
    assert rows[0, 3].item() == tok.eos_token_id and rows[1, 3].item() == tok.eos_token_id
    assert tok.decode(rows[0, :3]) == "ba be bi"


def test_batches_are_a_function_of_step_and_seed():
    data = TokenData(train=torch.arange(40).view(10, 4), heldout=torch.zeros(1, 4, dtype=torch.long))
    epoch = torch.cat([data.batch(s, 2, seed=1) for s in range(5)])
    assert sorted(epoch[:, 0].tolist()) == list(range(0, 40, 4))  # one epoch visits every row once
    assert torch.equal(data.batch(3, 2, seed=1), data.batch(3, 2, seed=1))
    assert not torch.equal(epoch, torch.cat([data.batch(s, 2, seed=2) for s in range(5)]))


def test_text_jsonl_and_parquet_sources(tmp_path):
    docs = tiny_corpus(n_docs=6, words_per_doc=10)
    (tmp_path / "a.txt").write_text("\n\n\n".join(docs))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    assert load_documents(str(tmp_path / "a.txt")) == docs
    assert load_documents(str(tmp_path / "a.jsonl"), text_field="body") == docs
    assert load_documents(str(tmp_path / "a.parquet")) == docs
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.txt").write_text(docs[0])
    assert load_documents(str(tmp_path / "dir")) == [docs[0]]
    with pytest.raises(DataError, match="a.jsonl:1: no field 'text'"):
        load_documents(str(tmp_path / "a.jsonl"))
    with pytest.raises(DataError, match="not found"):
        load_documents(str(tmp_path / "missing.txt"))
    data = build_token_data(load_documents(str(tmp_path / "a.txt")), tiny_tokenizer(), seq_len=8)
    assert data.train.shape[1] == 8 and data.heldout.shape[0] >= 1


def test_teacher_samples_are_generated_once_and_cached(tmp_path, monkeypatch):
    from llamba.distill.testing import tiny_teacher

    monkeypatch.setenv("LLAMBA_CACHE", str(tmp_path))
    torch.set_num_threads(1)
    teacher, tok = tiny_teacher(), tiny_tokenizer()
    docs = load_documents("teacher:3", teacher=teacher, tokenizer=tok)
    assert len(docs) == 3 and all(isinstance(d, str) for d in docs)
    cached = list((tmp_path / "data").glob("teacher-*.jsonl"))
    assert len(cached) == 1
    monkeypatch.setattr("llamba.distill.data.SEED_PROMPTS", [])  # a second call must not sample again
    assert load_documents("teacher:3", teacher=teacher, tokenizer=tok) == docs
