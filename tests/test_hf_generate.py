"""transformers integration of the torch model: generate (greedy, sampling, beam search, streamers, stopping
criteria) with the recurrent state as cache, left padding through attention_mask, pipeline, checkpointing."""

import pytest
import torch
from conftest import checkpoint_tokenizer, random_model, tiny_llamba_config
from transformers import StoppingCriteria, StoppingCriteriaList, pipeline
from transformers.generation.streamers import BaseStreamer

from llamba.generate import SamplingParams, generate


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_llamba_config(), seed=0)


def prompt(seed=0, length=11, vocab=64):
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def test_greedy_generate_equals_llamba_generate_token_for_token(model):
    ids = prompt(1)
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert out[0, ids.shape[1] :].tolist() == generate(
        model, ids[0], SamplingParams(max_new_tokens=20, stop_token_ids=(2,))
    )


def test_only_new_tokens_are_fed_after_the_prompt(model):
    ids = prompt(2, length=17)
    seen = []
    hook = model.backbone.embedding.register_forward_hook(lambda mod, args, out: seen.append(args[0].numel()))
    try:
        model.generate(ids, max_new_tokens=8, do_sample=False)
    finally:
        hook.remove()
    assert seen == [17] + [1] * 7


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(do_sample=False, num_beams=3, num_return_sequences=2),
        dict(do_sample=True, top_k=8, temperature=0.9),
    ],
)
def test_cached_generation_equals_uncached(model, kwargs):
    """Beam search reorders the state rows; without a cache every step re-reads the whole sequence."""
    ids = prompt(3)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(5)
        runs.append(model.generate(ids, max_new_tokens=9, use_cache=use_cache, **kwargs))
    assert torch.equal(*runs)


def test_streamer_and_stopping_criteria(model):
    ids = prompt(4)

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + 4, dtype=torch.bool)

    streamer = Collect()
    out = model.generate(
        ids,
        max_new_tokens=30,
        do_sample=False,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([StopAfter()]),
    )
    assert out.shape[1] == ids.shape[1] + 4
    assert streamer.ended and streamer.chunks[0] == ids[0].tolist()
    assert sum(streamer.chunks[1:], []) == out[0, ids.shape[1] :].tolist()


def test_left_padding_is_ignored_through_attention_mask(model):
    short, long_ = prompt(5, length=6), prompt(6, length=13)
    batch = torch.cat([torch.cat([torch.zeros(1, 7, dtype=torch.long), short], 1), long_])
    mask = (torch.arange(13)[None] >= torch.tensor([[7], [0]])).long()
    logits = model(batch, attention_mask=mask).logits[:, -1]
    torch.testing.assert_close(logits[0], model(short).logits[0, -1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[1], model(long_).logits[0, -1], rtol=1e-4, atol=1e-5)
    kw = dict(
        max_new_tokens=8, min_new_tokens=8, do_sample=False
    )  # no eos: rows never stop at different steps
    out = model.generate(batch, attention_mask=mask, **kw)
    assert out[0, 13:].tolist() == model.generate(short, **kw)[0, 6:].tolist()
    assert out[1, 13:].tolist() == model.generate(long_, **kw)[0, 13:].tolist()


def test_text_generation_pipeline(model):
    tok = checkpoint_tokenizer()
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    text = pipe("the cat sat", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    ids = tok("the cat sat", return_tensors="pt").input_ids
    want = generate(model, ids[0], SamplingParams(max_new_tokens=6, stop_token_ids=(tok.eos_token_id,)))
    assert text.startswith("the cat sat") and text.endswith(tok.decode(want, skip_special_tokens=True))


def test_gradient_checkpointing_recomputes_and_keeps_gradients():
    ids = prompt(7, length=20)
    grads, calls = [], []
    for enable in (False, True):
        m = random_model(tiny_llamba_config(), seed=1).train()
        if enable:
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        n = [0]
        m.backbone.layers[0].mixer.register_forward_hook(lambda *a, n=n: n.__setitem__(0, n[0] + 1))
        m(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in m.parameters() if p.grad is not None]))
        calls.append(n[0])
    assert calls == [1, 2]  # the block ran again in the backward pass
    torch.testing.assert_close(grads[0], grads[1])
