import pytest
import torch

from llamba.generate import SamplingParams, generate, incremental_ids, process_logits, stream_generate
from llamba.model import LlambaForCausalLM


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    return LlambaForCausalLM(tiny_config).eval()


def test_greedy_equals_argmax_of_full_forward(model):
    prompt = [5, 6, 7, 8]
    out = generate(model, prompt, max_new_tokens=6)
    ids = torch.tensor([prompt])
    for tok in out:  # teacher-forced check: each greedy token is the argmax given everything before it
        assert tok == int(model(ids).logits[0, -1].argmax())
        ids = torch.cat([ids, torch.tensor([[tok]])], 1)


def test_seeded_sampling_is_reproducible(model):
    kw = dict(max_new_tokens=8, temperature=0.9, top_p=0.95, top_k=20, seed=123)
    assert generate(model, [1, 2, 3], **kw) == generate(model, [1, 2, 3], **kw)


def test_stop_token_ends_generation(model):
    first = generate(model, [1, 2, 3], max_new_tokens=1)[0]
    assert generate(model, [1, 2, 3], max_new_tokens=10, stop_token_ids=[first]) == [first]


def test_state_carries_across_calls(model):
    """Two turns through one state give the tokens of one call over the concatenated context."""
    state = model.alloc_state(1)
    turn1 = generate(model, [1, 2, 3], state=state, max_new_tokens=4)
    turn2 = generate(model, [9, 10], state=state, max_new_tokens=4)
    assert state.seqlen == 3 + 4 + 2 + 4
    assert generate(model, [1, 2, 3, *turn1, 9, 10], max_new_tokens=4) == turn2


def test_top_k_and_top_p_masks():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    lp = process_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.isinf(lp[0, 2:]).all() and torch.isfinite(lp[0, :2]).all()
    probs = torch.softmax(logits, -1)[0]  # 0.636, 0.234, 0.086, ...
    lp = process_logits(logits, SamplingParams(temperature=1.0, top_p=0.8))
    kept = torch.isfinite(lp[0]).nonzero().flatten().tolist()
    assert kept == [0, 1] and probs[0] < 0.8 <= probs[0] + probs[1]
    lp = process_logits(logits, SamplingParams(temperature=1.0, top_p=0.01))
    assert torch.isfinite(lp[0]).nonzero().flatten().tolist() == [0]  # the most likely token always stays


def test_repetition_penalty_hand_values():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    lp = process_logits(logits, SamplingParams(repetition_penalty=2.0), context=torch.tensor([[0, 1]]))
    expected = torch.log_softmax(torch.tensor([[1.0, -4.0, 1.0]]), -1)
    torch.testing.assert_close(lp, expected)


def test_bad_sampling_values():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(TypeError, match="unknown sampling option"):
        SamplingParams().with_overrides(temprature=1.0)


def test_incremental_ids():
    assert incremental_ids([1, 2], [1, 2, 3, 4]) == [3, 4]
    assert incremental_ids([1, 5], [1, 2, 3]) is None
    assert incremental_ids([], [7]) == [7]


def test_stream_yields_tokens_one_by_one(model):
    stream = stream_generate(model, [1, 2], max_new_tokens=3)
    assert isinstance(next(stream), int)
    assert len(list(stream)) == 2


def test_compiled_step_matches_the_eager_step(model):
    """use_compiled_step: one torch.compile graph per step writing the state in place gives the eager logits
    (relative error) and state at every step, starting from a prefill's state (views into its conv window)."""
    torch.manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (1, 9))
    eager_state, comp_state = model.alloc_state(1), model.alloc_state(1)
    with torch.no_grad():
        model(prompt, state=eager_state)
        model(prompt, state=comp_state)
    twin = LlambaForCausalLM(model.config).eval()
    twin.load_state_dict(model.state_dict())
    twin.use_compiled_step()
    tok = torch.tensor([3])
    for _ in range(5):
        ref, got = model.step(tok, eager_state), twin.step(tok, comp_state)
        assert ((got - ref).norm() / ref.norm()).item() < 1e-5
        tok = ref.argmax(-1)
    assert twin.__dict__["_compiled_step"] is not None, "compile fell back to eager"
    assert comp_state.seqlen == eager_state.seqlen == 9 + 5
    for a, b in zip(eager_state.conv + eager_state.ssm, comp_state.conv + comp_state.ssm, strict=True):
        assert ((a - b).norm() / b.norm().clamp_min(1e-12)).item() < 1e-5


def test_compiled_step_falls_back_to_eager_with_one_warning(model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nmore lines")

    monkeypatch.setattr(torch, "compile", broken)
    state, ref_state = model.alloc_state(1), model.alloc_state(1)
    ref = model.step(torch.tensor([2]), ref_state)
    model.use_compiled_step()
    with pytest.warns(
        UserWarning, match=r"torch.compile of the decode step failed \(RuntimeError: no C\+\+ compiler\)"
    ):
        got = model.step(torch.tensor([2]), state)
    assert torch.equal(got, ref) and state.seqlen == 1 and model.__dict__["_compiled_step"] is None
    model.step(torch.tensor([2]), state)  # eager from now on: no second warning, no error
