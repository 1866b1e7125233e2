"""Teacher vs student on held-out text: perplexities, mean KL(teacher || student), next-token top-1 agreement,
and per-layer relative hidden-state error ||h_s - h_t|| / ||h_t||, two ways:
    layer_rel_err   teacher-forced: student block i on the teacher's hidden_states[i] vs hidden_states[i+1]
                    (what stages 1-2 optimize, one number per layer)
    stream_rel_err  free-running: the student's own residual stream after layer i vs the teacher's
Both leave out position 0 of every row: a Llama teacher parks its attention sink there, a "massive activation"
(in SmolLM2-135M the residual norm at position 0 is ~25,000 from layer 11 on, ~150 elsewhere) that would make
the error read ~0.99 whatever the student does, while the mixers have no use for a sink.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llamba.checkpoints import load_model
from llamba.distill.data import load_documents, pack, split_documents
from llamba.distill.options import option
from llamba.distill.teacher import get_teacher, resolve_device, teacher_residuals
from llamba.errors import UsageError


@torch.no_grad()
def evaluate_tokens(
    student, teacher_model, ids: torch.Tensor, batch_size: int = 4, per_layer: bool = True
) -> dict:
    """ids: (n, l) held-out rows on the models' device -> metrics dict (see the module docstring)."""
    student.eval()
    n_layer = len(student.backbone.layers)
    nll_s = nll_t = kl = agree = count = 0.0
    diff_tf = torch.zeros(n_layer, dtype=torch.float64)
    diff_st = torch.zeros(n_layer, dtype=torch.float64)
    ref = torch.zeros(n_layer, dtype=torch.float64)
    for start in range(0, ids.shape[0], batch_size):
        x = ids[start : start + batch_size]
        t = teacher_residuals(teacher_model, x)
        s = student(x, return_residuals=True)
        for i, block in enumerate(student.backbone.layers):
            target = t["resid"][i + 1][:, 1:].float()  # (b, l - 1, d): past the sink position
            diff_st[i] += (s.residuals[i + 1][:, 1:].float() - target).pow(2).sum().item()
            ref[i] += target.pow(2).sum().item()
            if per_layer:  # student block i on the teacher's stream
                pred, _, _ = block(t["resid"][i])
                diff_tf[i] += (pred[:, 1:].float() - target).pow(2).sum().item()
        s_logits = s.logits
        t_logits = t["logits"]
        targets = x[:, 1:].reshape(-1)
        nll_s += F.cross_entropy(
            s_logits[:, :-1].reshape(-1, s_logits.shape[-1]), targets, reduction="sum"
        ).item()
        nll_t += F.cross_entropy(
            t_logits[:, :-1].reshape(-1, t_logits.shape[-1]), targets, reduction="sum"
        ).item()
        log_ps, log_pt = F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1)
        kl += (log_pt.exp() * (log_pt - log_ps)).sum().item() / x.shape[1] * (x.shape[1] - 1)
        agree += (s_logits[:, :-1].argmax(-1) == t_logits[:, :-1].argmax(-1)).sum().item()
        count += targets.numel()
    out = {
        "tokens": int(ids.numel()),
        "teacher_ppl": math.exp(nll_t / count),
        "student_ppl": math.exp(nll_s / count),
        "kl": kl / count,
        "top1_agreement": agree / count,
        "stream_rel_err": (diff_st / ref).sqrt().tolist(),
    }
    out["ppl_ratio"] = out["student_ppl"] / out["teacher_ppl"]
    if per_layer:
        out["layer_rel_err"] = (diff_tf / ref).sqrt().tolist()
    return out


def heldout_rows(
    teacher,
    seq_len: int,
    data=None,
    text_field: str = "text",
    docs: list[str] | None = None,
    stream: bool = False,
) -> torch.Tensor:
    """The held-out rows (n, seq_len) of `--data` for a run.Teacher: the fixed 10% document split in memory, or the
    stream's held-out documents (distill/stream.py) with `stream`."""
    if stream:
        from llamba.distill.stream import open_source

        held = open_source(data, text_field, teacher.model, teacher.tokenizer, docs).heldout
    else:
        if docs is None:
            docs = load_documents(data, text_field, teacher.model, teacher.tokenizer)
        held = split_documents(docs)[1]
    return pack(teacher.tokenizer, held, seq_len)


@dataclass
class EvalOptions:
    """What `evaluate` measures on (its fields are `llamba eval`'s options)."""

    data: str | None = option(
        None, "As in `llamba distill` (its held-out split is used).", show_default=False
    )
    text_field: str = option("text", "Field holding the text in JSONL/Parquet.")
    seq_len: int = option(256, "Length of the held-out rows.", low=2)
    max_tokens: int = option(2048, "Held-out tokens to evaluate on (whole rows).", low=2)
    batch_size: int = option(4, "Rows per forward.", low=1)
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    stream: bool = option(False, "Evaluate on the held-out documents of a `distill --stream` run.")
    chat: bool = option(
        True,
        "Also the generation-based chat report on prompts that never enter training: factual answers "
        "kept, chat and general-prose perplexity ratios, answers that end (needs a chat template).",
    )
    per_layer: bool = True  # the teacher-forced per-layer error (one block call per layer and row)


def evaluate(
    model, teacher="default", opts: EvalOptions | None = None, docs: list[str] | None = None
) -> dict:
    """model: a Llamba checkpoint directory or a LlambaForCausalLM; teacher: a spec for load_teacher, a
    (model, tokenizer) pair or a run.Teacher; opts.data: a --data spec (its held-out split is used; `stream`: the
    held-out documents of a `--stream` run; `docs`: the run's documents, already loaded). Evaluates on up to
    max_tokens held-out tokens in rows of seq_len. Returns the metrics dict of `evaluate_tokens`, plus under "chat"
    the generation-based report of distill/chat_eval.py (with `chat` and a teacher tokenizer that has a chat
    template)."""
    o = opts or EvalOptions()
    seq_len, dev = o.seq_len, resolve_device(o.device)
    # The student first: a wrong --model fails at once, before the teacher is loaded (or converted from GGUF).
    student = load_model(model, device=dev) if isinstance(model, (str, Path)) else model.to(dev)
    t = get_teacher(teacher, dev)
    if student.config.vocab_size != t.model.config.vocab_size:
        raise UsageError(
            f"student vocab_size {student.config.vocab_size} != teacher vocab_size "
            f"{t.model.config.vocab_size}: they were not distilled from each other"
        )
    t_layers = t.model.config.num_hidden_layers
    if student.config.n_layer != t_layers:
        raise UsageError(
            f"student has {student.config.n_layer} layers but the teacher has {t_layers}: they were not "
            "distilled from each other; pass the --teacher the student was distilled from"
        )
    held = heldout_rows(t, seq_len, o.data, o.text_field, docs, o.stream)
    n = max(1, min(held.shape[0], o.max_tokens // seq_len))
    out = evaluate_tokens(student, t.model, held[:n].to(dev), o.batch_size, o.per_layer)
    if o.chat:
        from llamba.distill.chat_eval import chat_report

        out["chat"] = chat_report(student, t.model, t.tokenizer)
    return out
