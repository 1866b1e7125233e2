"""Ecosystem benchmarks (issue 12): how fast `llamba --help` is, and whether transformers' `model.generate`
keeps the recurrent model's flat per-token cost.

(a) wall time of `llamba --help` and `llamba generate --help` in fresh processes, against `import click, rich`
    (goal: under 1 s);
(b) decode ms/token of `model.generate` (the LlambaState as cache) at several prompt lengths, interleaved with
    `llamba.generate` on the same model (goal: flat in the context; overhead of GenerationMixin).

    python bench/bench_ecosystem.py                # appended to BENCHMARKS.md
    python bench/bench_ecosystem.py --no-append --contexts 64 512
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_section, markdown_table  # noqa: E402


def wall(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_ms(fn, n_new: int) -> float:
    """fn(n) generates n tokens; the per-token decode time is the difference of n_new and 1 token runs."""
    t0 = time.perf_counter()
    fn(1)
    t1 = time.perf_counter()
    fn(n_new + 1)
    t2 = time.perf_counter()
    return 1000 * ((t2 - t1) - (t1 - t0)) / n_new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 1024, 4096], help="prompt lengths")
    ap.add_argument("--new", type=int, default=32, help="decoded tokens per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell (median)")
    ap.add_argument(
        "--no-append", action="store_true", help="print only, do not append to bench/results/HISTORY.md"
    )
    args = ap.parse_args()
    load = Path("/proc/loadavg").read_text().split()[:3]

    py = sys.executable
    rows_a = [
        [name, f"{wall(cmd, args.repeats):.2f}"]
        for name, cmd in [
            ("python -c 'import click, rich'", [py, "-c", "import click, rich"]),
            ("llamba --help", [py, "-m", "llamba", "--help"]),
            ("llamba generate --help", [py, "-m", "llamba", "generate", "--help"]),
        ]
    ]

    import torch

    from llamba.config import LlambaConfig
    from llamba.generate import SamplingParams, generate
    from llamba.model import LlambaForCausalLM

    torch.set_num_threads(1)  # the machine is shared: one thread avoids OpenMP spin contention
    torch.manual_seed(0)
    config = LlambaConfig(
        vocab_size=4096,
        d_model=256,
        n_layer=8,
        intermediate_size=768,
        d_state=32,
        n_v_heads=8,
        n_qk_heads=8,
        chunk_size=128,
    )
    model = LlambaForCausalLM(config).eval()
    rows_b = []
    for ctx in args.contexts:
        ids = torch.randint(0, config.vocab_size, (1, ctx))
        hf, ours = [], []
        for _ in range(args.repeats):  # interleaved A/B
            hf.append(
                decode_ms(
                    lambda n, ids=ids: model.generate(
                        ids, max_new_tokens=n, min_new_tokens=n, do_sample=False
                    ),
                    args.new,
                )
            )
            ours.append(
                decode_ms(
                    lambda n, ids=ids: generate(model, ids[0], SamplingParams(max_new_tokens=n)), args.new
                )
            )
        h, o = statistics.median(hf), statistics.median(ours)
        rows_b.append([ctx, f"{h:.2f}", f"{o:.2f}", f"{h / o:.2f}"])
    base = float(rows_b[0][1])
    for r in rows_b:
        r.append(f"{float(r[1]) / base:.2f}")

    body = (
        f"Load average at start: {' '.join(load)} (machine shared with other jobs; medians of {args.repeats}).\n\n"
        "(a) fresh-process wall time, seconds\n\n"
        + markdown_table(["command", "s"], rows_a)
        + f"\n\n(b) greedy decode ms/token, random Llamba (d 256, 8 layers, vocab 4096, fp32, 1 torch thread), {args.new} new tokens\n\n"
        + markdown_table(
            ["context", "model.generate", "llamba.generate", "ratio", "vs first context"], rows_b
        )
    )
    print(body)
    if not args.no_append:
        append_section("Ecosystem: CLI start-up and transformers generate (issue 12)", body)


if __name__ == "__main__":
    main()
