"""Stock mlx-lm batching on an exported Llamba: every row of `mlx_lm.batch_generate` generates what it would alone
(the exported model honours mlx-lm's padding mask), for short and long prompts and chunked prefill."""

import pytest
from conftest import make_checkpoint, tiny_llamba_config

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")

from llamba.export.convert import convert  # noqa: E402

PROMPTS = [
    [7, 12, 9],
    [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38],
    [40, 8],
    [5, 6, 7, 8, 9, 10, 11, 12, 13],
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlxbatch")
    make_checkpoint(root / "ckpt", tiny_llamba_config(), seed=21)
    out = convert(root / "ckpt", root / "mlx", dtype="float32")
    return mlx_lm.load(str(out), trust_remote_code=True)


@pytest.mark.parametrize("prefill_step_size", [2048, 4])
def test_batch_generate_equals_batch_of_one(exported, prefill_step_size):
    model, tokenizer = exported
    kw = dict(max_tokens=10, return_token_ids=True, prefill_step_size=prefill_step_size)
    batch = mlx_lm.batch_generate(model, tokenizer, PROMPTS, **kw)
    alone = [mlx_lm.batch_generate(model, tokenizer, [p], **kw) for p in PROMPTS]
    assert batch.token_ids == [a.token_ids[0] for a in alone]
    assert batch.texts == [a.texts[0] for a in alone]


def test_batch_of_one_equals_stock_generate(exported):
    """The single-row path is the ordinary (unmasked) prefill + O(1) decode."""
    model, tokenizer = exported
    for p in PROMPTS:
        ids = [r.token for r in mlx_lm.stream_generate(model, tokenizer, p, max_tokens=10)]
        ids = (
            ids[:-1] if ids[-1] in tokenizer.eos_token_ids else ids
        )  # batch_generate leaves the stop token out
        got = mlx_lm.batch_generate(model, tokenizer, [p], max_tokens=10, return_token_ids=True).token_ids[0]
        assert got == ids
