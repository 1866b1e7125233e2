"""Tiny offline teachers and tokenizers for tests and smoke runs (no downloads): a random GQA Llama with
4 query / 2 kv heads and a word-level tokenizer over a fixed vocabulary."""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = [f"{a}{b}" for a in "bcdfghklmnprstvz" for b in ("a", "e", "i", "o", "u", "an", "er", "is", "ot")]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, ".": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", pad_token="[EOS]"
    )


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_VOCAB = len(WORDS) + 7  # the tiny chat tokenizer's vocabulary (tiny_teacher(vocab_size=CHAT_VOCAB))


def tiny_chat_tokenizer():
    """The tiny vocabulary with ChatML markers and a ChatML template (<|im_end|> is EOS, as in SmolLM2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<|im_end|>": 1, ".": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    for w in ("<|im_start|>", "system", "user", "assistant"):
        vocab[w] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_teacher(
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    tie: bool = True,
    vocab_size: int = len(WORDS) + 3,
):
    """A random LlamaForCausalLM (eval mode, frozen) over the tiny tokenizer's vocabulary (CHAT_VOCAB for the
    chat tokenizer's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        eos_token_id=1,
        pad_token_id=1,
        bos_token_id=None,
        initializer_range=0.1,
    )
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    model.set_attn_implementation("sdpa")
    return model


def tiny_corpus(n_docs: int = 60, words_per_doc: int = 120, seed: int = 0) -> list[str]:
    """Documents drawn from a fixed bigram-ish process, so there is structure to learn."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        w, out = rng.choice(WORDS), []
        for _ in range(words_per_doc):
            out.append(w)
            i = WORDS.index(w)
            w = (
                WORDS[(i * 7 + rng.choice((1, 2, 3))) % len(WORDS)]
                if rng.random() < 0.8
                else rng.choice(WORDS)
            )
        docs.append(" ".join(out) + " .")
    return docs


def write_tiny_teacher(path: Path, **kwargs) -> Path:
    """Save a tiny teacher + tokenizer as a Hugging Face directory (what `--teacher DIR` reads)."""
    model = tiny_teacher(**kwargs)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
