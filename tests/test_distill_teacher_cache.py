import pytest
import torch
from conftest import tiny_corpus, tiny_teacher, tiny_tokenizer

from llamba.distill.config import DistillConfig
from llamba.distill.data import build_token_data
from llamba.distill.init import build_student
from llamba.distill.stages import default_spec, split_budget
from llamba.distill.teacher import Teacher, teacher_residuals
from llamba.distill.teacher_cache import TeacherStateCache, epoch_pool
from llamba.distill.train import train_stage

QUIET = DistillConfig(device="cpu", no_progress=True)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    teacher = Teacher(tiny_teacher(), tiny_tokenizer(), "tiny")
    return teacher, build_token_data(tiny_corpus(), teacher.tokenizer, 32)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 0.0), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("with_attn_out", [False, True])
def test_cache_returns_the_teacher_states(setup, dtype, tol, with_attn_out):
    teacher, data = setup
    cache = TeacherStateCache(teacher.model, with_attn_out=with_attn_out, dtype=dtype)
    first, mixed = data.train[:3], data.train[[2, 5, 0, 7]]  # the second batch: 2 rows seen, 2 new
    cache(first)
    got = cache(mixed)
    ref = teacher_residuals(teacher.model, mixed, with_attn_out=with_attn_out)
    assert (cache.hits, cache.misses) == (2, 5)
    assert len(cache.rows) == 5
    pairs = list(zip(got["resid"], ref["resid"], strict=True))
    if with_attn_out:
        pairs += list(zip(got["attn_out"], ref["attn_out"], strict=True))
    else:
        assert got["attn_out"] is None
    for g, r in pairs:
        assert g.dtype == r.dtype and g.shape == r.shape
        rel = ((g - r).norm() / r.norm()).item()
        print(f"{dtype} rel err {rel:.2e}")
        assert rel <= tol


def test_epoch_pool_is_a_seeded_subset_of_the_training_rows(setup):
    _, data = setup
    pool = epoch_pool(
        data, tokens=6 * 4 * 32, epochs=4, seed=3
    )  # 6 steps of 4 rows of 32 in 4 epochs -> 6 rows
    assert pool.train.shape == (6, 32)
    rows = {tuple(r.tolist()) for r in data.train}
    assert all(tuple(r.tolist()) in rows for r in pool.train)
    assert torch.equal(pool.train, epoch_pool(data, 6 * 4 * 32, 4, seed=3).train)
    assert not torch.equal(pool.train, epoch_pool(data, 6 * 4 * 32, 4, seed=4).train)
    assert epoch_pool(data, 10**9, 2).train is data.train  # larger than the split: everything
    assert torch.equal(pool.heldout, data.heldout)


def test_cached_stage2_runs_the_teacher_once_per_row(setup, tmp_path):
    """4 epochs over a pool of rows: the teacher runs on epoch 1 only, and the run equals an uncached stage 2
    trained on the same rows in the same order (up to the bf16 rounding of the cached states)."""
    teacher, data = setup
    calls = []
    hook = teacher.model.model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        spec = default_spec(2, tokens=8 * 4 * 32, seq_len=32, batch_size=4, lr=3e-3, epochs=4)
        pool = epoch_pool(data, spec.tokens, spec.epochs, spec.seed)
        assert pool.train.shape[0] == 8
        cached = build_student(teacher.model, seed=0)
        s1 = train_stage(spec, cached, teacher, pool, tmp_path / "a", QUIET)
        n_cached = len(calls)
        plain_spec = default_spec(2, tokens=spec.tokens, seq_len=32, batch_size=4, lr=3e-3, epochs=1)
        plain = build_student(teacher.model, seed=0)
        s2 = train_stage(plain_spec, plain, teacher, pool, tmp_path / "b", QUIET)
    finally:
        hook.remove()
    assert n_cached == 2  # epoch 1 = 2 batches of 4 new rows, one teacher forward each
    assert len(calls) - n_cached == spec.total_steps
    assert s1["final_loss"] == pytest.approx(s2["final_loss"], rel=2e-2)


def test_split_budget_normalizes_the_shares():
    assert split_budget(1000, {1: 1, 2: 1, 3: 2}) == {1: 250, 2: 250, 3: 500}
    assert split_budget(1000, {2: 0.5, 3: 0.5})[1] == 1  # an absent stage still gets one token (one step)
    assert sum(split_budget(80_000).values()) == pytest.approx(80_000, abs=3)


def test_bf16_flags_and_precision_choice(monkeypatch):
    from llamba.distill import stages

    text = "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile amx_bf16\nbugs\t\t: none\n"
    assert stages.bf16_flags(text) == ["amx_bf16", "avx512_bf16"]
    assert stages.bf16_flags("flags\t\t: fpu sse2 avx2 avx512f\n") == []
    assert stages.bf16_flags("no flags line") == []
    cpu = torch.device("cpu")
    assert stages.use_bf16(default_spec(3, 1000, precision="bf16"), cpu)
    assert not stages.use_bf16(default_spec(3, 1000, precision="fp32"), cpu)
    monkeypatch.setattr(stages, "cpu_bf16", lambda: True)
    for flag in (True, False):  # conftest pins it off; the choice itself is tested here
        monkeypatch.setattr(stages, "CPU_AUTO_BF16", flag)
        assert stages.use_bf16(default_spec(3, 1000), cpu) is flag
    monkeypatch.setattr(stages, "cpu_bf16", lambda: False)
    assert not stages.use_bf16(default_spec(3, 1000), cpu)
