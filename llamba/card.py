"""The model card (README.md) every saved Llamba checkpoint carries, written from its config alone."""

from __future__ import annotations

from llamba.config import LlambaConfig

# Generation-based checks on prompts that never entered training (distill/chat_eval.py), shown first on the card.
CARD_METRICS = (
    ("data", "distillation data", str),
    (
        "fact_retained",
        "factual answers kept (of the teacher's right ones, greedy)",
        lambda v: f"{float(v):.0%}",
    ),
    ("chat_ppl_ratio", "chat perplexity ratio (teacher's sampled answers)", lambda v: f"{float(v):.2f}"),
    ("prose_ppl_ratio", "general-prose perplexity ratio", lambda v: f"{float(v):.2f}"),
    ("eos_rate", "answers that end (end-of-turn within 256 tokens)", lambda v: f"{float(v):.0%}"),
)


def model_card(config: LlambaConfig) -> str:
    """README.md of a checkpoint: what it is, where it came from (config.distillation), how to load it."""
    info = config.distillation or {}
    teacher = info.get("teacher") or "unknown"
    tokens = f"{int(info['tokens']):,}" if info.get("tokens") is not None else "unknown"
    ratio = f"{float(info['ppl_ratio']):.3f}" if info.get("ppl_ratio") is not None else "not measured"
    chat_rows = "".join(
        f"| {label} | {fmt(info[key])} |\n" for key, label, fmt in CARD_METRICS if info.get(key) is not None
    )
    params = config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2) + config.n_layer * (
        config.d_model * (config.d_in_proj + config.d_inner + 3 * config.intermediate_size)
    )
    return f"""---
library_name: transformers
tags: [llamba, mamba-2, distillation, recurrent]
---
# Llamba student

A recurrent Llamba model: the Llama skeleton with every attention block replaced by a discrete Mamba-2 mixer,
distilled with MOHAWK (matrix orientation, hidden-state alignment, knowledge distillation).

| | |
|---|---|
| teacher | {teacher} |
| distillation budget (tokens) | {tokens} |
{chat_rows}| held-out perplexity ratio (student / teacher), training-corpus split | {ratio} |
| layers / width / heads / state | {config.n_layer} / {config.d_model} / {config.n_v_heads} / {config.d_state} |
| parameters (approx.) | {params / 1e6:.1f}M |

Decoding memory is constant in the context length: the whole context lives in a fixed-size recurrent state.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)  # or `import llamba` first
tokenizer = AutoTokenizer.from_pretrained(DIR)
out = model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=32)
```

`configuration_llamba.py` and `modeling_llamba.py` are generated from the `llamba` package and need only torch
and transformers.
"""
