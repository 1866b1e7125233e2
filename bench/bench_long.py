"""Long context, measured (issue 25): the report of distill/long_eval.py for one student checkpoint beside its teacher.

    OMP_NUM_THREADS=1 python bench/bench_long.py --model runs/demo2/stage3                    # 512..8k, 2 + 1 seeds
    python bench/bench_long.py --model RUN/stage3 --lengths 512,1k,2k --seeds 3 --report long.json

Passkey and needle retrieval (teacher / student right, of trials, greedy through the chat template) by length and
depth, then perplexity by position bucket on held-out text; printed as Markdown tables headed by the machine
(CPU model, cores), the date and the load average, and appended to RESULTS as one JSON line per table row (the
`run` field groups the rows of one invocation). `--report` also writes the whole report (every prompt's answers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, commit, machine, markdown_table  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "long_context.jsonl"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Llamba checkpoint directory (e.g. runs/demo2/stage3)")
    p.add_argument("--teacher", default="default")
    p.add_argument("--lengths", default="512,1k,2k,4k,8k", help="comma-separated, k = 1024")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="shares of the filler before the needle")
    p.add_argument("--seeds", type=int, default=2, help="passkey prompts per (length, depth); 0 = none")
    p.add_argument("--needle-seeds", type=int, default=1, help="needle prompts per (length, depth); 0 = none")
    p.add_argument(
        "--ppl-rows", type=int, default=1, help="rows of held-out text for perplexity by position; 0 = none"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--report", type=Path, default=None, help="also write the whole report (every answer) here"
    )
    p.add_argument("--no-append", action="store_true", help=f"do not append to {RESULTS.relative_to(ROOT)}")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    from llamba.checkpoints import load_model
    from llamba.distill.cli import quiet_hf
    from llamba.distill.long_eval import LongSettings, check_lengths, long_report, parse_lengths, tables
    from llamba.distill.teacher import get_teacher, resolve_device

    quiet_hf()
    lengths = parse_lengths(args.lengths)
    depths = tuple(float(d) for d in args.depths.split(","))
    dev = resolve_device(args.device)
    student = load_model(args.model, device=dev)
    teacher = get_teacher(args.teacher, dev)
    check_lengths(lengths, teacher.model.config)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    settings = LongSettings(
        lengths, depths, seeds=args.seeds, needle_seeds=args.needle_seeds, ppl_rows=args.ppl_rows
    )
    report = long_report(
        student,
        teacher.model,
        teacher.tokenizer,
        settings,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    wall = time.perf_counter() - t0

    print(
        f"\n_{stamp} · {machine()} · {args.threads} torch thread(s) · load average {load:.1f} at start · "
        f"commit {commit()}_\n"
    )
    print(
        f"`{args.model}` beside teacher `{args.teacher}`, {wall / 60:.1f} min wall (teacher "
        f"{report['seconds']['teacher']:.0f} s, student {report['seconds']['student']:.0f} s of generation; "
        f"perplexity {report['seconds'].get('position_ppl', 0):.0f} s)\n"
    )
    for title, header, rows in tables(report):
        print(f"**{title}**\n\n{markdown_table(header, rows)}\n")

    common = {
        "run": stamp,
        "model": args.model,
        "teacher": args.teacher,
        "machine": machine(),
        "threads": args.threads,
        "load_avg": round(load, 2),
        "commit": commit(),
        "wall_s": round(wall, 1),
        "seeds": args.seeds,
        "needle_seeds": args.needle_seeds,
    }
    lines = [{**common, "kind": "retrieval", **c} for c in report["cells"]]
    pp = report.get("position_ppl", {"buckets": []})
    lines += [
        {**common, "kind": "position_ppl", "rows": pp["rows"], "row_tokens": pp["row_tokens"], **b}
        for b in pp["buckets"]
    ]
    if not args.no_append:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        print(f"appended {len(lines)} rows to {RESULTS.relative_to(ROOT)}")
    if args.report:
        args.report.write_text(json.dumps({**common, **report}, indent=1))
    return report


if __name__ == "__main__":
    main()
