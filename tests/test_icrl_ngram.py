"""n-gram successor matrix: hand-built successor sets, slow-reference equivalence, causality, controls."""

import pytest
import torch

from llamba.icrl.model import ADConfig, ADTransformer
from llamba.icrl.ngram import match_keys, ngram_attention, ngram_attention_ref, ngram_mask, permuted_attention

KEYS = [0, 1, 2, 0, 1, 2, 0, 1]
# successors u of each position t: positions right after earlier occurrences of the length-n suffix ending at t
EXPECTED = {
    1: {3: [1], 4: [2], 5: [3], 6: [1, 4], 7: [2, 5]},
    2: {4: [2], 5: [3], 6: [4], 7: [2, 5]},
    3: {5: [3], 6: [4], 7: [5]},
}


def successor_sets(a: torch.Tensor) -> dict[int, list[int]]:
    return {t: torch.nonzero(a[t]).flatten().tolist() for t in range(a.shape[0]) if a[t].any()}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_hand_built_successor_sets(n):
    a = ngram_attention(torch.tensor([KEYS]), n)[0]
    assert successor_sets(a) == EXPECTED[n]
    for t, succ in EXPECTED[n].items():
        assert a[t, succ].tolist() == [1 / len(succ)] * len(succ)  # uniform over successors
    assert torch.equal(a.sum(-1) > 0, torch.tensor([t in EXPECTED[n] for t in range(8)]))


def test_state_vs_sar_keys():
    # a walk that revisits state 5 twice with different (previous action, reward) on the way in
    states = torch.tensor([[5, 6, 5, 6, 5]])
    prev_a = torch.tensor([[5, 2, 4, 2, 4]])  # 5 = pad at the history start
    prev_r = torch.tensor([[2, 0, 0, 0, 1]])  # 2 = pad
    state_key = match_keys(states, prev_a, prev_r, "state", 81, 2)
    sar_key = match_keys(states, prev_a, prev_r, "sar", 81, 2)
    assert successor_sets(ngram_attention(state_key, 1)[0]) == {2: [1], 3: [2], 4: [1, 3]}
    # (a=4, r=0, s=5) at t=2 vs (a=4, r=1, s=5) at t=4 differ; (2,0,6) repeats at t=1, 3
    assert successor_sets(ngram_attention(sar_key, 1)[0]) == {3: [2]}
    assert successor_sets(ngram_attention(sar_key, 2)[0]) == {}
    assert successor_sets(ngram_attention(state_key, 2)[0]) == {3: [2], 4: [3]}
    with pytest.raises(ValueError):
        match_keys(states, prev_a, prev_r, "reward", 81, 2)


@pytest.mark.parametrize("num_states, num_actions, num_rewards", [(81, 5, 2), (4, 7, 3), (9, 2, 5)])
def test_sar_keys_are_one_id_per_triple(num_states, num_actions, num_rewards):
    """Every (pad-inclusive) action x reward x state triple gets its own id, for any action / reward counts."""
    a, r, s = torch.meshgrid(
        torch.arange(num_actions + 1), torch.arange(num_rewards + 1), torch.arange(num_states), indexing="ij"
    )
    keys = match_keys(s.reshape(1, -1), a.reshape(1, -1), r.reshape(1, -1), "sar", num_states, num_rewards)
    assert keys.unique().numel() == keys.numel() == (num_actions + 1) * (num_rewards + 1) * num_states


@pytest.mark.parametrize("n", [1, 2, 3])
def test_batched_equals_per_sample_reference(n):
    g = torch.Generator().manual_seed(n)
    keys = torch.randint(0, 4, (6, 40), generator=g)
    a = ngram_attention(keys, n)
    for i in range(6):
        ref = torch.tensor(ngram_attention_ref(keys[i].tolist(), n))
        torch.testing.assert_close(a[i], ref)
        torch.testing.assert_close(ngram_attention(keys[i : i + 1], n)[0], a[i])


def test_strictly_causal_and_no_gradient():
    keys = torch.randint(0, 3, (4, 30), generator=torch.Generator().manual_seed(0))
    for n in (1, 2, 3):
        m = ngram_mask(keys, n)
        assert not m.triu().any()  # never u >= t
        a = ngram_attention(keys, n)
        assert not a.requires_grad
        # row t only depends on keys[<= t]: changing the future leaves earlier rows intact
        for t in (5, 17, 28):
            k2 = keys.clone()
            k2[:, t + 1 :] = torch.randint(0, 3, k2[:, t + 1 :].shape)
            torch.testing.assert_close(ngram_attention(k2, n)[:, : t + 1], a[:, : t + 1])


def test_permuted_control_keeps_sparsity_and_causality():
    keys = torch.randint(0, 3, (3, 25), generator=torch.Generator().manual_seed(1))
    a = ngram_attention(keys, 1)
    p = permuted_attention(a, torch.Generator().manual_seed(0))
    assert torch.equal((p > 0).sum(-1), (a > 0).sum(-1))
    assert not (p > 0).triu().any()
    torch.testing.assert_close(p.sum(-1), a.sum(-1))
    assert not torch.equal(p, a)


def tiny_cfg(**kw):
    return ADConfig(
        num_states=9,
        num_actions=5,
        seq_len=24,
        d_model=16,
        n_layers=2,
        n_heads=2,
        dropout=0.0,
        attn_dropout=0.0,
        emb_dropout=0.0,
        **kw,
    )


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"ngram_layers": [0]},
        {"ngram_layers": [0, 1], "ngram_orders": [1, 2]},
        {"ngram_layers": [1], "ngram_key": "sar", "ngram_orders": [3]},
    ],
)
def test_model_is_causal_and_never_sees_the_predicted_action(kw):
    torch.manual_seed(0)
    model = ADTransformer(tiny_cfg(**kw)).eval()
    g = torch.Generator().manual_seed(2)
    s, a, r = (torch.randint(0, k, (3, 24), generator=g) for k in (9, 5, 2))
    logits = model(s, a, r)
    for t in (0, 7, 15, 22):
        # position t predicts a_t, which only enters the input at t + 1 (as prev action); perturb all of t+1..
        s2, a2, r2 = s.clone(), a.clone(), r.clone()
        s2[:, t + 1 :] = (s2[:, t + 1 :] + 1) % 9
        a2[:, t + 1 :] = (a2[:, t + 1 :] + 1) % 5
        r2[:, t + 1 :] = 1 - r2[:, t + 1 :]
        torch.testing.assert_close(model(s2, a2, r2)[:, : t + 1], logits[:, : t + 1])


def test_model_batched_equals_per_sample():
    torch.manual_seed(0)
    model = ADTransformer(tiny_cfg(ngram_layers=[0], ngram_orders=[1, 2])).eval()
    g = torch.Generator().manual_seed(3)
    s, a, r = (torch.randint(0, k, (4, 20), generator=g) for k in (9, 5, 2))
    full = model(s, a, r)
    for i in range(4):
        torch.testing.assert_close(
            model(s[i : i + 1], a[i : i + 1], r[i : i + 1])[0], full[i], atol=1e-5, rtol=1e-5
        )


def test_ngram_block_uses_the_fixed_matrix():
    """The n-gram head mixes exactly A @ Norm(h): zero the W1 path and compare with a manual computation."""
    torch.manual_seed(0)
    model = ADTransformer(tiny_cfg(ngram_layers=[0])).eval()
    block = model.blocks[0]
    torch.nn.init.zeros_(block.w1.weight)
    torch.nn.init.zeros_(block.w1.bias)
    h = torch.randn(2, 10, 16)
    keys = torch.randint(0, 3, (2, 10), generator=torch.Generator().manual_seed(4))
    a = ngram_attention(keys, 1)
    expected = h + block.mlp(block.w2[0](a @ block.norm(h)))
    torch.testing.assert_close(block(h, a[None]), expected)


def test_bad_model_config():
    with pytest.raises(ValueError):
        tiny_cfg(ngram_layers=[2])
    with pytest.raises(ValueError):
        tiny_cfg(ngram_key="reward")
    with pytest.raises(ValueError):
        tiny_cfg(ngram_orders=[0])
