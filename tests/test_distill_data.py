import json

import pytest
import torch
from conftest import tiny_corpus, tiny_tokenizer

from llamba.distill.data import (
    DataError,
    TokenData,
    build_token_data,
    load_documents,
    pack,
    python_docs_corpus,
    split_documents,
)


def test_python_docs_corpus_ships_with_python_and_is_prose():
    docs = load_documents("python-docs")
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
    (tmp_path / "dir" / "y.md").write_text(docs[1])
    assert load_documents(str(tmp_path / "dir")) == [docs[0], docs[1]]
    with pytest.raises(DataError, match="a.jsonl:1: no field 'text'"):
        load_documents(str(tmp_path / "a.jsonl"))
    with pytest.raises(DataError, match="not found"):
        load_documents(str(tmp_path / "missing.txt"))
    data = build_token_data(load_documents(str(tmp_path / "a.txt")), tiny_tokenizer(), seq_len=8)
    assert data.train.shape[1] == 8 and data.heldout.shape[0] >= 1


def test_default_data_is_the_teachers_chat_rendered_with_its_template(tmp_path, monkeypatch):
    from conftest import CHAT_VOCAB, tiny_chat_tokenizer, tiny_teacher

    from llamba.distill import chat_data
    from llamba.distill.data import chat_spec

    monkeypatch.setenv("LLAMBA_CACHE", str(tmp_path))
    monkeypatch.setattr(chat_data, "SHIPPED_DIR", tmp_path / "none")
    torch.set_num_threads(1)
    teacher, tok = tiny_teacher(vocab_size=CHAT_VOCAB), tiny_chat_tokenizer()
    monkeypatch.setattr(chat_data.ChatSettings, "max_new_tokens", 6)
    docs = load_documents("teacher:4", teacher=teacher, tokenizer=tok)
    assert docs == load_documents("chat:4", teacher=teacher, tokenizer=tok)  # two names, one corpus (cached)
    assert docs and all(d.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in d for d in docs)
    assert len(list((tmp_path / "data").glob("chat-train-*.jsonl"))) == 1
    assert (
        chat_spec(None) == chat_spec("chat") == chat_data.ChatSettings().n and chat_spec("notes.txt") is None
    )
    with pytest.raises(DataError, match="chat data needs an Instruct teacher|no chat template"):
        load_documents(None, teacher=teacher, tokenizer=tiny_tokenizer())
    with pytest.raises(DataError, match="integer >= 2"):
        load_documents("chat:x", teacher=teacher, tokenizer=tok)


def test_a_single_document_is_cut_so_a_heldout_split_exists(tmp_path):
    docs = tiny_corpus(n_docs=5, words_per_doc=20)
    one_blank = tmp_path / "one_blank_line.txt"  # documents separated by one blank line read as one document
    one_blank.write_text("\n\n".join(docs))
    assert load_documents(str(one_blank)) == docs
    single = tmp_path / "one.jsonl"
    single.write_text(json.dumps({"text": docs[0]}) + "\n")
    pieces = load_documents(str(single))
    assert len(pieces) == 10 and " ".join(pieces) == docs[0]
    data = build_token_data(pieces, tiny_tokenizer(), seq_len=8)
    assert data.heldout.numel() > 0
    (tmp_path / "word.txt").write_text("pa")
    with pytest.raises(DataError, match="too short to hold out"):
        load_documents(str(tmp_path / "word.txt"))


@pytest.mark.parametrize("value, kind", [(None, "null"), (42, "int"), (["a"], "list")])
def test_a_text_field_that_is_not_a_string_is_refused_by_row(tmp_path, value, kind):
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps({"text": "pa pe"}) + "\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(DataError, match=f"rows.jsonl:2: field 'text' is {kind}, not text"):
        load_documents(str(f))


def test_binary_and_non_utf8_files_are_refused(tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match="binary file .NUL byte at offset"):
        load_documents(str(weights))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 ol\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8 text .byte 0xe9 at offset 3"):
        load_documents(str(latin))


def test_parquet_int_column_and_null_rows_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match="column 'text' has type int64, not string"):
        load_documents(str(tmp_path / "ints.parquet"))
    pq.write_table(pa.table({"text": ["pa pe", None]}), tmp_path / "nulls.parquet")
    with pytest.raises(DataError, match="nulls.parquet row 1: field 'text' is null"):
        load_documents(str(tmp_path / "nulls.parquet"))


def test_mistyped_relative_paths_are_not_hub_names(tmp_path, monkeypatch):
    from llamba.distill.data import is_hub_name

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert is_hub_name("wikitext") and is_hub_name("allenai/c4")
    assert not is_hub_name("data/corpus")  # data/ exists here: a typo of a local path
    assert not is_hub_name("corpus.bin") and not is_hub_name("org/corpus.safetensors")
    with pytest.raises(DataError, match="--data data/corpus: no such file or directory"):
        load_documents("data/corpus")
