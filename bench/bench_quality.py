"""Distillation quality per unit of compute: `distill_all` on the embedded teacher at a ladder of budgets.

    python bench/bench_quality.py run --variant default --tokens 6000,12000,24000   # one JSON line per rung
    python bench/bench_quality.py run --variant paper-lr --tokens 6000 --seed 0
    python bench/bench_quality.py report --append --plot bench/quality.png          # tables + log-log plot
    python bench/bench_quality.py variants                                           # what each variant changes

Each rung is a fresh run directory; per rung it records the held-out perplexity ratio (student / teacher), mean
KL(teacher || student), top-1 agreement, the mean teacher-forced per-layer relative error, tokens, wall time and CPU
time of the process (getrusage: all threads, teacher loading excluded), the CPU model, its bf16 flags and the load
average. Results accumulate in RESULTS (JSON lines), so rungs can be run one process at a time; `report` groups
them into one table per lever and plots ratio vs CPU-minutes. Held-out rows come from the fixed 10% document
split; `run` checks and records that no 32-token window of them occurs in the training rows.

GPU (NOT run yet: no GPU was available when this was written; the budget is an estimate for ~10 minutes on one
H100/H200-class GPU, bf16 autocast by `--precision auto`, rows of 256 in micro-batches of 16):
    python bench/bench_quality.py run --variant gpu --tokens 3000000 --device cuda --eval-tokens 16384 --threads 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_section, markdown_table  # noqa: E402

# committed: the tables of BENCHMARKS.md come from them. quality.jsonl: rungs on the CPython reference (the default
# data before chat data); quality_chat.jsonl: on the teacher's chat data, with the chat report's columns.
RESULTS = ROOT / "bench" / "results" / "quality_chat.jsonl"

# name -> (lever, what it changes, DistillConfig.of keyword arguments). "default" is whatever the code defaults are.
# Variants compose: `--variant demo-lr+split-s2` merges both (later ones win, stage by stage).
VARIANTS: dict[str, tuple[str, str, dict]] = {
    "default": ("ladder", "the defaults of `llamba distill all`", {}),
    "paper-lr": (
        "lr",
        "reference LRs 1e-4 / 1e-4 / 5e-5 (the old default)",
        {"stage_overrides": {1: {"lr": 1e-4}, 2: {"lr": 1e-4}, 3: {"lr": 5e-5}}},
    ),
    "demo-lr": (
        "lr",
        "the old demo's LRs 1e-3 / 1e-3 / 3e-4",
        {"stage_overrides": {1: {"lr": 1e-3}, 2: {"lr": 1e-3}, 3: {"lr": 3e-4}}},
    ),
    "lr2-3e-3": ("lr", "stage-2 LR 3e-3", {"stage_overrides": {2: {"lr": 3e-3}}}),
    "lr2-5e-4": ("lr", "stage-2 LR 5e-4", {"stage_overrides": {2: {"lr": 5e-4}}}),
    "lr3-1.5e-4": ("lr", "stage-3 LR 1.5e-4", {"stage_overrides": {3: {"lr": 1.5e-4}}}),
    "lr3-3e-4": (
        "lr",
        "stage-3 LR 3e-4 (the default before lr3-1.5e-4 won)",
        {"stage_overrides": {3: {"lr": 3e-4}}},
    ),
    "lr3-1e-3": ("lr", "stage-3 LR 1e-3", {"stage_overrides": {3: {"lr": 1e-3}}}),
    "lr3-1e-4": ("lr", "stage-3 LR 1e-4", {"stage_overrides": {3: {"lr": 1e-4}}}),
    "split-old": ("split", "old split 3.75 / 33.75 / 62.5 %", {"split": {1: 0.0375, 2: 0.3375, 3: 0.625}}),
    "split-s3": ("split", "split 2 / 18 / 80 % (stage 3 heavy)", {"split": {1: 0.02, 2: 0.18, 3: 0.8}}),
    "split-s2-64": (
        "split",
        "split 2 / 64 / 34 % (stage 2 heavier still)",
        {"split": {1: 0.02, 2: 0.64, 3: 0.34}},
    ),
    "split-s2": ("split", "split 2 / 48 / 50 % (stage 2 heavy)", {"split": {1: 0.02, 2: 0.48, 3: 0.5}}),
    "split-s1": (
        "split",
        "split 20 / 38 / 42 % (stage 1, matrix orientation, gets a real share: ~80 steps at 100k tokens, not 12)",
        {"split": {1: 0.2, 2: 0.38, 3: 0.42}},
    ),
    "no-cache": (
        "cache",
        "stage 2 one pass, teacher run on every batch (epochs 1)",
        {"stage_overrides": {2: {"epochs": 1}}},
    ),
    "cache-4": (
        "cache",
        "stage 2: 4 epochs over a quarter of its tokens, teacher states cached (bf16)",
        {"stage_overrides": {2: {"epochs": 4}}},
    ),
    "seq128": (
        "batch",
        "stages 2-3 at sequence length 128 (eval stays at 256)",
        {"stage_overrides": {2: {"seq_len": 128}, 3: {"seq_len": 128}}},
    ),
    "b2s128": (
        "batch",
        "stages 2-3: micro-batch 2 x 128 tokens (4x the steps per token of 4 x 256; the default before b1s128)",
        {"stage_overrides": {2: {"seq_len": 128, "batch_size": 2}, 3: {"seq_len": 128, "batch_size": 2}}},
    ),
    "s3-b1": (
        "batch",
        "stage 3: micro-batch 1 x 128 (2x its optimizer steps)",
        {"stage_overrides": {3: {"batch_size": 1}}},
    ),
    "b1s256": (
        "batch",
        "stages 2-3: micro-batch 1 x 256 tokens (the steps per token of 2 x 128, rows that hold a question and its answer)",
        {"stage_overrides": {2: {"seq_len": 256, "batch_size": 1}, 3: {"seq_len": 256, "batch_size": 1}}},
    ),
    "b1s128": (
        "batch",
        "stages 2-3: micro-batch 1 x 128 tokens (2x the optimizer steps per token of 2 x 128; the default)",
        {"stage_overrides": {2: {"seq_len": 128, "batch_size": 1}, 3: {"seq_len": 128, "batch_size": 1}}},
    ),
    "bf16": ("precision", "bf16 autocast for the student on every stage", {"precision": "bf16"}),
    "gpu": (
        "gpu",
        "stages 2-3: micro-batch 16 x 256 (a GPU wants bigger batches)",
        {"stage_overrides": {2: {"seq_len": 256, "batch_size": 16}, 3: {"seq_len": 256, "batch_size": 16}}},
    ),
    "hard-0.5": ("kd", "stage 3 + 0.5 x hard-label CE", {"stage_overrides": {3: {"hard_weight": 0.5}}}),
    "temp-2": ("kd", "stage 3 temperature 2", {"stage_overrides": {3: {"temperature": 2.0}}}),
    "teacher-bf16": (
        "precision",
        "stage 3: the teacher's forward under bf16 autocast too (now the default)",
        {"stage_overrides": {3: {"teacher_bf16": True}}},
    ),
    "grouped-bc": (
        "arch",
        "B/C heads grouped to the teacher's 3 KV heads (--qk-heads 3; issue 15's speed lever)",
        {"qk_heads": 3},
    ),
    "kd-all": (
        "kd",
        "stage 3 KD on every token (the default before assistant-token KD)",
        {"stage_overrides": {3: {"kd_tokens": "all"}}},
    ),
    "init-slow": (
        "init",
        "--init llamba-slow: an A_log bias per head, the decay starting at exp(-dt), dt log-uniform in [0.001, 0.1]",
        {"init": "llamba-slow"},
    ),
    "python-docs": (
        "data",
        "the CPython language reference as data (the default before chat data)",
        {"data": "python-docs"},
    ),
    "teacher-fp32": (
        "precision",
        "stage 3: the teacher's forward in fp32 (the default before teacher-bf16)",
        {"stage_overrides": {3: {"teacher_bf16": False}}},
    ),
}


def variant_kwargs(name: str) -> tuple[str, str, dict]:
    """'a+b' -> (lever of the last part, descriptions joined, merged DistillConfig.of kwargs)."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; `bench_quality.py variants` lists them")
    merged: dict = {}
    for p in parts:
        for k, v in VARIANTS[p][2].items():
            if k == "stage_overrides":
                so = merged.setdefault(k, {})
                for stage, o in v.items():
                    so[stage] = {**so.get(stage, {}), **o}
            else:
                merged[k] = v
    return VARIANTS[parts[-1]][0], " + ".join(VARIANTS[p][1] for p in parts), merged


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_description() -> dict:
    """lscpu's model name and which bf16 instructions the CPU reports (avx512_bf16, amx_bf16)."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16"})}


def _windows(rows: torch.Tensor, window: int) -> list[set[bytes]]:
    """rows: (n, l) -> per row, the set of its `window`-token windows."""
    if rows.shape[1] < window:
        return [set() for _ in rows]
    w = rows.unfold(1, window, 1)  # (n, l - window + 1, window)
    return [{r.numpy().astype("int32").tobytes() for r in row} for row in w]


def overlap_fraction(train: torch.Tensor, held: torch.Tensor, window: int = 32) -> float:
    """Fraction of the held-out rows' `window`-token windows that also occur anywhere in the training rows.
    train, held: (n, l) token ids."""
    seen = set().union(*_windows(train, window))
    held_w = set().union(*_windows(held, window))
    return len(held_w & seen) / max(1, len(held_w))


def clean_heldout(train: torch.Tensor, held: torch.Tensor, window: int = 32) -> torch.Tensor:
    """The held-out rows none of whose `window`-token windows occurs in the training rows: (n', l). The default
    corpus repeats passages across its topics, so the document split alone leaves some shared text."""
    seen = set().union(*_windows(train, window))
    keep = [i for i, w in enumerate(_windows(held, window)) if not (w & seen)]
    return held[keep]


CHAT_KEYS = (
    "fact_retained",
    "teacher_facts_right",
    "student_facts_right",
    "chat_ppl_ratio",
    "prose_ppl_ratio",
    "eos_rate",
    "empty_answers",
)


def run_rungs(
    variant: str,
    budgets: list[int],
    seed: int,
    device: str,
    threads: int,
    eval_tokens: int,
    results: Path,
    keep: bool,
) -> None:
    from llamba.checkpoints import load_model
    from llamba.distill.cli import quiet_hf
    from llamba.distill.config import DistillConfig
    from llamba.distill.data import build_token_data, load_documents
    from llamba.distill.evaluate import evaluate_tokens
    from llamba.distill.run import distill_all
    from llamba.distill.teacher import get_teacher, resolve_device

    torch.set_num_threads(threads)
    quiet_hf()  # no transformers progress bars between the JSON rows
    lever, what, kwargs = variant_kwargs(variant)
    dev = resolve_device(device)
    teacher = get_teacher("default", dev)
    docs = load_documents(kwargs.get("data"), "text", teacher.model, teacher.tokenizer)
    td = build_token_data(docs, teacher.tokenizer, 256)
    overlap = overlap_fraction(td.train, td.heldout[: max(1, eval_tokens // 256)])
    clean = clean_heldout(td.train, td.heldout)[: max(1, eval_tokens // 256)]
    print(
        f"{overlap:.1%} of the held-out 32-token windows occur in the training rows; the clean evaluation uses "
        f"{clean.shape[0]} held-out rows without any ({overlap_fraction(td.train, clean):.1%})",
        flush=True,
    )
    results.parent.mkdir(parents=True, exist_ok=True)
    for tokens in budgets:
        out = (
            ROOT / "runs" / "bench_quality" / f"{variant}__{tokens}__s{seed}"
        )  # run dirs stay out of the repo
        shutil.rmtree(out, ignore_errors=True)
        load0 = os.getloadavg()[0]
        c0, w0 = cpu_seconds(), time.perf_counter()
        cfg = DistillConfig.of(
            teacher=teacher,
            out=str(out),
            tokens=tokens,
            device=str(dev),
            no_progress=True,
            seed=seed,
            eval_tokens=eval_tokens,
            ckpt_every=1e9,
            **kwargs,
        )
        res = distill_all(cfg)
        cpu, wall = cpu_seconds() - c0, time.perf_counter() - w0
        ev = res["eval"]
        student = load_model(out / "stage3")
        ev_clean = evaluate_tokens(student, teacher.model, clean.to(dev), per_layer=False)
        row = {
            "variant": variant,
            "lever": lever,
            "what": what,
            "tokens": tokens,
            "stage_tokens": {k: s["tokens"] for k, s in res["stages"].items()},
            "specs": {
                k: {
                    f: spec[f]
                    for f in (
                        "lr",
                        "seq_len",
                        "batch_size",
                        "epochs",
                        "precision",
                        "temperature",
                        "hard_weight",
                        "warmup",
                        "decay",
                        "teacher_bf16",
                    )
                }
                for k in (1, 2, 3)
                for spec in [json.loads((out / f"stage{k}" / "spec.json").read_text())]
            },
            "qk_heads": student.config.n_qk_heads,
            "params": sum(p.numel() for p in student.parameters()),
            "seed": seed,
            "threads": threads,
            "device": str(dev),
            "ppl_ratio": ev["ppl_ratio"],
            "student_ppl": ev["student_ppl"],
            "teacher_ppl": ev["teacher_ppl"],
            "init_ppl_ratio": res["init"]["ppl_ratio"],
            "kl": ev["kl"],
            "top1": ev["top1_agreement"],
            "layer_err": sum(ev["layer_rel_err"]) / len(ev["layer_rel_err"]),
            "eval_tokens": ev["tokens"],
            "heldout_overlap": overlap,
            "clean_ppl_ratio": ev_clean["ppl_ratio"],
            "clean_kl": ev_clean["kl"],
            "clean_top1": ev_clean["top1_agreement"],
            "clean_tokens": ev_clean["tokens"],
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "load_start": load0,
            "load_end": os.getloadavg()[0],
            **cpu_description(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "data": kwargs.get("data") or "chat",
            **{k: ev["chat"][k] for k in CHAT_KEYS if k in ev.get("chat", {})},
        }
        print(json.dumps(row), flush=True)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if not keep:
            shutil.rmtree(out, ignore_errors=True)


def report(results: Path, append: bool, plot: Path | None, notes: Path | None = None) -> None:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    header = [
        "variant",
        "what",
        "tokens (s1/s2/s3)",
        "seed",
        "facts kept",
        "chat ratio",
        "prose ratio",
        "ends",
        "ppl ratio",
        "clean ratio",
        "KL",
        "top-1",
        "layer err",
        "CPU min",
        "wall min",
        "load",
    ]

    def chat_cells(r: dict) -> list[str]:
        if "fact_retained" not in r:
            return ["-"] * 4
        return [
            f"{r['fact_retained']:.0%}",
            f"{r['chat_ppl_ratio']:.2f}",
            f"{r['prose_ppl_ratio']:.2f}",
            f"{r['eos_rate']:.0%}",
        ]

    def fmt(group: list[dict]) -> list[list]:
        return [
            [
                r["variant"],
                r["what"],
                f"{r['tokens']:,} ({'/'.join(str(r['stage_tokens'][k]) for k in ('1', '2', '3'))})",
                r["seed"],
                *chat_cells(r),
                f"{r['ppl_ratio']:.2f}",
                f"{r['clean_ppl_ratio']:.2f}" if "clean_ppl_ratio" in r else "-",
                f"{r['kl']:.3f}",
                f"{r['top1']:.1%}",
                f"{r['layer_err']:.3f}",
                f"{r['cpu_s'] / 60:.1f}",
                f"{r['wall_s'] / 60:.1f}",
                f"{r['load_start']:.1f}-{r['load_end']:.1f}",
            ]
            for r in group
        ]

    # A variant "a+b" is the lever b added to "a": its table holds the rows of both (same seed), so each lever is
    # read against the run it changes. A plain variant run at a budget the `default` ladder also has joins one
    # table of single levers against that default row; the default rows form the ladder (budgets of one recipe).
    body, names = [], list(dict.fromkeys(r["variant"] for r in rows))
    default_at = {r["tokens"]: r for r in rows if r["variant"] == "default"}
    singles = [
        r
        for r in rows
        if "+" not in r["variant"] and r.get("lever") != "ladder" and r["tokens"] in default_at
    ]
    for tokens in sorted({r["tokens"] for r in singles}):
        group = [dict(default_at[tokens], what="baseline")] + [
            dict(r, what=r["what"]) for r in singles if r["tokens"] == tokens
        ]
        body.append(
            f"### Single levers on the defaults at {tokens:,} tokens\n\n" + markdown_table(header, fmt(group))
        )
    for variant in names:
        if variant in {r["variant"] for r in singles}:
            continue
        parts = variant.split("+")
        base = next(
            ("+".join(parts[:k]) for k in range(len(parts) - 1, 0, -1) if "+".join(parts[:k]) in names), None
        )
        group = [dict(r) for r in rows if r["variant"] in (base, variant)]
        group.sort(key=lambda r: (r["variant"] != base, r["tokens"]))
        if base is None:
            title = f"`{variant}` ({group[0]['what']}) at {len(group)} budget(s)"
        else:
            added = parts[len(base.split("+")) :]
            title = (
                f"lever `{'+'.join(added)}` ({'; '.join(VARIANTS[a][1] for a in added)}) added to `{base}`"
            )
        for r in group:
            r["what"] = "baseline" if r["variant"] == base else "with the lever" if base else "-"
        body.append(f"### {title}\n\n" + markdown_table(header, fmt(group)))
    r0 = rows[0]
    peak = max(max(r["load_start"], r["load_end"]) for r in rows)
    busy = (
        "shared with other jobs"
        if peak > r0["cores"] + 0.5
        else f"no other job beside the runs (peak load {peak:.1f} on {r0['cores']} cores, one rung at a time)"
    )
    intro = (
        f"CPU {r0['cpu']} ({r0['cores']} cores, bf16 flags: {', '.join(r0['bf16_flags']) or 'none'}), {busy} "
        f"(load = 1-min load average at start-end of each rung). Teacher: embedded "
        f"SmolLM2-135M-Instruct (held-out ppl {r0['teacher_ppl']:.2f}); data: {r0.get('data', 'python-docs')}; chat "
        f"columns from the chat report (distill/chat_eval.py: prompts never trained on; facts kept = share of "
        f"the teacher's right factual answers the student also gives; ends = answers that end within 256 "
        f"tokens); the perplexity ratio on "
        f"{r0['eval_tokens']:,} held-out tokens of the training data (fixed 10% document split; {r0['heldout_overlap']:.1%} of their "
        f"32-token windows occur in the training rows: the corpus repeats passages across topics), and "
        f"(`clean ratio`, KL and top-1 then also on these rows) on {r0.get('clean_tokens', 2048):,} held-out "
        f"tokens of rows that share no 32-token window with the training rows. CPU = user+system seconds of the process (all threads, "
        f"teacher loading excluded), {r0['threads']} torch thread(s). Script: `bench/bench_quality.py`."
    )
    text = intro + "\n\n" + "\n\n".join(body)
    if notes is not None:
        text += "\n\n" + notes.read_text().strip()
    print(text)
    if plot is not None:
        plot_curves(rows, plot)
        text += f"\n\n![ratio vs CPU-minutes]({os.path.relpath(plot, ROOT)})"
    if append:
        append_section("Distillation quality vs compute (bench_quality)", text)


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=90)
    for variant in dict.fromkeys(r["variant"] for r in rows if r.get("lever") == "ladder"):  # recipes: lines
        pts = sorted((r["cpu_s"] / 60, r["ppl_ratio"]) for r in rows if r["variant"] == variant)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=variant, ms=4)
    levers = [(r["cpu_s"] / 60, r["ppl_ratio"]) for r in rows if r.get("lever") != "ladder"]
    if levers:  # ablation rows: points
        ax.plot(
            [p[0] for p in levers], [p[1] for p in levers], "x", color="gray", ms=5, label="single levers"
        )
    ax.axhline(3.0, color="gray", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("CPU-minutes (distill all, all threads)")
    ax.set_ylabel("held-out ppl ratio (student / teacher)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", lw=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="distill at each budget of --tokens; one JSON line per rung")
    r.add_argument("--variant", default="default", help="a name from `variants`, or several joined by +")
    r.add_argument("--tokens", default="24000", help="comma-separated total token budgets (the ladder)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="cpu")
    r.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: least CPU time on a shared machine)"
    )
    r.add_argument("--eval-tokens", type=int, default=2048)
    r.add_argument("--results", type=Path, default=RESULTS)
    r.add_argument("--keep", action="store_true", help="keep the run directories")
    p = sub.add_parser("report", help="tables per lever (and a plot) from the results file")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--append", action="store_true", help="append the tables to BENCHMARKS.md")
    p.add_argument("--plot", type=Path, default=None, help="PNG: ppl ratio vs CPU-minutes, log-log")
    p.add_argument("--notes", type=Path, default=None, help="a Markdown file appended below the tables")
    sub.add_parser("variants", help="list the variants")
    a = ap.parse_args()
    if a.cmd == "run":
        run_rungs(
            a.variant,
            [int(x) for x in a.tokens.split(",")],
            a.seed,
            a.device,
            a.threads,
            a.eval_tokens,
            a.results,
            a.keep,
        )
    elif a.cmd == "report":
        report(a.results, a.append, a.plot.resolve() if a.plot else None, a.notes)
    else:
        for name, (lever, what, kw) in VARIANTS.items():
            print(f"{name:10s} {lever:10s} {what}  {kw}")


if __name__ == "__main__":
    main()
