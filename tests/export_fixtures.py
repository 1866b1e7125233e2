"""Tiny offline checkpoints and tokenizers for the export tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = [
    "hello",
    "world",
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "what",
    "is",
    "a",
    "dog",
    "red",
    "blue",
    "sun",
    "moon",
    "tree",
    "and",
    "or",
    "not",
    "yes",
    "no",
    "why",
    "how",
    "run",
    "jump",
    "fast",
    "slow",
    "big",
    "small",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "you",
    "me",
    "we",
    "they",
    "it",
    "see",
    "go",
    "come",
    "up",
    "down",
    "left",
    "right",
    "good",
    "bad",
    "day",
    "night",
    "rain",
    "snow",
    "wind",
]
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def tiny_tokenizer():
    """A whitespace word-level tokenizer with a ChatML-like template; 64 tokens (= tiny_config vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + ["system", "user", "assistant"] + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        additional_special_tokens=SPECIALS[1:],
    )
    tok.chat_template = TEMPLATE
    return tok


def tiny_config(**overrides):
    from llamba.config import LlambaConfig

    fields = dict(
        vocab_size=64,
        d_model=32,
        n_layer=2,
        intermediate_size=64,
        d_state=8,
        n_v_heads=4,
        n_qk_heads=2,
        chunk_size=8,
        eos_token_id=2,
    )
    return LlambaConfig(**(fields | overrides))


def random_model(config, seed: int = 0):
    """A Llamba whose every parameter is perturbed (non-identity conv and gate, varied decays)."""
    from llamba.model import LlambaForCausalLM

    torch.manual_seed(seed)
    model = LlambaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def make_checkpoint(path: Path, config=None, seed: int = 0, tokenizer: bool = True):
    """Save a random tiny Llamba (our HF layout) with the tiny tokenizer; returns the torch model."""
    model = random_model(config or tiny_config(), seed)
    model.save_pretrained(path)
    if tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return model
