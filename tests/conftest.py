"""The test kit: every shared helper of the suite, in one place (test modules import them with
`from conftest import ...`; the worker scripts run from this folder do the same).

    tiny_teacher, write_tiny_teacher   a random GQA Llama teacher (4 query / 2 kv heads) and its HF directory
    tiny_tokenizer, tiny_chat_tokenizer, tiny_corpus   its word-level tokenizers (plain, ChatML) and a corpus
    tiny_llamba_config, random_model, make_checkpoint, checkpoint_tokenizer   tiny Llamba students and checkpoints
    rel_err                             ||a - b|| / ||b|| of two tensors
    tiny_config (fixture)               a tiny LlambaConfig with an odd vocabulary (101)
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # several test files run beside each other on a 2-core machine

# Distillation tests compare runs to tight tolerances; they must not depend on whether this CPU has bf16
# instructions (precision 'auto' would turn bf16 autocast on where it does). Inherited by worker processes.
os.environ["LLAMBA_CPU_BF16"] = "0"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| over the whole tensor, in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.fixture
def tiny_config():
    return tiny_llamba_config(vocab_size=101, eos_token_id=None)


# --------------------------------------------------------------------------------------------------
# Tiny teachers, tokenizers and corpus (no downloads)
# --------------------------------------------------------------------------------------------------
WORDS = [f"{a}{b}" for a in "bcdfghklmnprstvz" for b in ("a", "e", "i", "o", "u", "an", "er", "is", "ot")]


def word_tokenizer(words: list[str], template: str | None = None, **special):
    """A whitespace word-level fast tokenizer: token id i is words[i]; `special`: unk_token, eos_token, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=special["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **special)
    if template is not None:
        tok.chat_template = template
    return tok


def tiny_tokenizer():
    """The tiny teacher's plain-text tokenizer: [UNK], [EOS] (also the pad), "." and WORDS."""
    return word_tokenizer(
        ["[UNK]", "[EOS]", ".", *WORDS], unk_token="[UNK]", eos_token="[EOS]", pad_token="[EOS]"
    )


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_VOCAB = len(WORDS) + 7  # the tiny chat tokenizer's vocabulary (tiny_teacher(vocab_size=CHAT_VOCAB))


def tiny_chat_tokenizer():
    """The tiny vocabulary with ChatML markers and a ChatML template (<|im_end|> is EOS, as in SmolLM2)."""
    words = ["[UNK]", "<|im_end|>", ".", *WORDS, "<|im_start|>", "system", "user", "assistant"]
    return word_tokenizer(
        words,
        CHAT_TEMPLATE,
        unk_token="[UNK]",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )


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


# --------------------------------------------------------------------------------------------------
# Tiny Llamba students and checkpoints
# --------------------------------------------------------------------------------------------------
CHECKPOINT_WORDS = [
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
CHECKPOINT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def checkpoint_tokenizer():
    """A whitespace word-level tokenizer with a ChatML-like template; 64 tokens (= tiny_llamba_config's vocab)."""
    return word_tokenizer(
        [*SPECIALS, "system", "user", "assistant", *CHECKPOINT_WORDS],
        CHECKPOINT_TEMPLATE,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        additional_special_tokens=SPECIALS[1:],
    )


def tiny_llamba_config(**overrides):
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
    model = random_model(config or tiny_llamba_config(), seed)
    model.save_pretrained(path)
    if tokenizer:
        checkpoint_tokenizer().save_pretrained(path)
    return model
