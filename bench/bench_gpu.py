"""The kernels="cuda" path on a GPU: accuracy and speed of `ssd_chunked` (cuda vs torch, and mamba-ssm's own
`mamba_chunk_scan_combined` called directly on the same inputs), the decode step, and one bf16 distillation
stage on the embedded teacher. Run by bench/gpu_check.sh; appends one section to BENCHMARKS.md.

    python bench/bench_gpu.py                       # on a CUDA GPU with mamba-ssm and causal-conv1d (~2 min)
    python bench/bench_gpu.py --smoke --no-append   # tiny shapes; checks the script itself (CPU harness too)

Shapes: the SmolLM2-135M student's mixer (h = g = 9, p = 64, n = 64, chunk 128).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_section, markdown_table  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, warmup: int, iters: int) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def inputs(b, l, h, g, p, n, dtype, dev, seed=0):
    gen = torch.Generator().manual_seed(seed)
    log_decay = -F.softplus(torch.randn(b, l, h, generator=gen) - 1)
    x = torch.randn(b, l, h, p, generator=gen)
    B = torch.randn(b, l, g, n, generator=gen) / n**0.5
    C = torch.randn(b, l, g, n, generator=gen) / n**0.5
    return x.to(dev, dtype), log_decay.to(dev), B.to(dev, dtype), C.to(dev, dtype)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def fwd_bwd(leaves, q, kernels):
    from llamba.ops import ssd_chunked

    y, s = ssd_chunked(*leaves, q, kernels=kernels)
    (y.float().square().sum() + s.square().sum()).backward()


def bench_scan(dev, shapes, dtypes, warmup, iters):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    from llamba.ops import ssd_chunked

    rows = []
    h = g = 9
    p = n = 64
    q = 128
    for dtype in dtypes:
        for b, l in shapes:
            x, a, B, C = inputs(b, l, h, g, p, n, dtype, dev)
            dt = -a
            xd = (x.float() / dt[..., None]).to(dtype)
            A = -torch.ones(h, device=dev)
            y_t, s_t = ssd_chunked(x, a, B, C, q, kernels="torch")
            y_c, s_c = ssd_chunked(x, a, B, C, q, kernels="cuda")
            ms = {
                "torch": timed(partial(ssd_chunked, x, a, B, C, q, kernels="torch"), dev, warmup, iters),
                "cuda": timed(partial(ssd_chunked, x, a, B, C, q, kernels="cuda"), dev, warmup, iters),
                "mamba-ssm": timed(
                    partial(
                        mamba_chunk_scan_combined, xd, dt.to(dtype), A, B, C, q, return_final_states=True
                    ),
                    dev,
                    warmup,
                    iters,
                ),
            }
            leaves = [t.detach().requires_grad_() for t in (x, a, B, C)]
            ms_b = {k: timed(partial(fwd_bwd, leaves, q, k), dev, warmup, iters) for k in ("torch", "cuda")}
            rows.append(
                [
                    str(dtype).removeprefix("torch."),
                    b,
                    l,
                    f"{rel_err(y_c, y_t):.1e}",
                    f"{rel_err(s_c, s_t):.1e}",
                    f"{ms['torch']:.2f}",
                    f"{ms['cuda']:.2f}",
                    f"{ms['mamba-ssm']:.2f}",
                    f"{ms['torch'] / ms['cuda']:.1f}x",
                    f"{ms_b['torch']:.2f}",
                    f"{ms_b['cuda']:.2f}",
                    f"{ms_b['torch'] / ms_b['cuda']:.1f}x",
                ]
            )
            print(json.dumps({"scan": rows[-1]}), flush=True)
    header = [
        "dtype",
        "b",
        "l",
        "y rel err",
        "state rel err",
        "torch fwd ms",
        "cuda fwd ms",
        "mamba-ssm fwd ms",
        "fwd speed-up",
        "torch fwd+bwd ms",
        "cuda fwd+bwd ms",
        "fwd+bwd speed-up",
    ]
    return markdown_table(header, rows)


def bench_step(dev, batches, warmup, iters):
    from llamba.ops import ssd_step

    rows = []
    h = g = 9
    p = n = 64
    for b in batches:
        x, a, B, C = inputs(b, 1, h, g, p, n, torch.bfloat16, dev)
        x, a, B, C = x[:, 0], a[:, 0], B[:, 0], C[:, 0]
        s0 = torch.randn(b, h, p, n, device=dev)
        y_t, s_t = ssd_step(x, a, B, C, s0.clone(), kernels="torch")
        y_c, s_c = ssd_step(x, a, B, C, s0.clone(), kernels="cuda")
        st = s0.clone()
        ms_t = timed(partial(ssd_step, x, a, B, C, s0, kernels="torch"), dev, warmup, iters)
        ms_c = timed(partial(ssd_step, x, a, B, C, st, kernels="cuda"), dev, warmup, iters)
        rows.append(
            [
                b,
                f"{rel_err(y_c, y_t):.1e}",
                f"{rel_err(s_c, s_t):.1e}",
                f"{ms_t * 1e3:.0f}",
                f"{ms_c * 1e3:.0f}",
                f"{ms_t / ms_c:.1f}x",
            ]
        )
        print(json.dumps({"step": rows[-1]}), flush=True)
    return markdown_table(["b", "y rel err (bf16)", "state rel err", "torch us", "cuda us", "speed-up"], rows)


def bench_distill(tokens: int, device: str) -> str:
    """Stage 1 (a few tokens, to build the student) then stage 3 end to end, bf16, on the embedded teacher."""
    with tempfile.TemporaryDirectory() as run:
        base = [sys.executable, "-m", "llamba", "distill"]
        common = ["--out", run, "--device", device, "--precision", "bf16", "--no-progress"]
        subprocess.run([*base, "stage1", *common, "--tokens", "4096"], check=True, cwd=ROOT)
        t = time.perf_counter()
        subprocess.run(
            [*base, "stage3", *common, "--tokens", str(tokens), "--init-from", f"{run}/stage1"],
            check=True,
            cwd=ROOT,
        )
        wall = time.perf_counter() - t
        done = json.loads((Path(run) / "stage3" / "DONE.json").read_text())
    keep = {k: done[k] for k in ("tokens", "tok_s", "loss", "final_loss") if k in done}
    print(json.dumps({"distill": keep, "wall_s": round(wall, 1)}), flush=True)
    return markdown_table(
        ["stage", "precision", "tokens", "tok/s", "wall s (with load)", "summary"],
        [
            [
                "3 (KD, kernels auto)",
                "bf16",
                keep.get("tokens", tokens),
                keep.get("tok_s", "?"),
                f"{wall:.0f}",
                json.dumps(keep),
            ]
        ],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 iteration (checks the script)")
    ap.add_argument("--distill-tokens", type=int, default=131072, help="stage-3 token budget (0 skips it)")
    ap.add_argument(
        "--no-append", action="store_true", help="print only, do not append to bench/results/HISTORY.md"
    )
    args = ap.parse_args()
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        where = torch.cuda.get_device_name(dev)
    else:  # only for --smoke under the CPU harness of tests/cuda_sim
        sys.path.insert(0, str(ROOT / "tests"))
        import cuda_sim

        cuda_sim.install()
        dev, where = torch.device("cpu"), "CPU, Triton interpreter (tests/cuda_sim)"
    if args.smoke:
        shapes, dtypes, batches, warmup, iters = [(1, 256)], [torch.bfloat16], [1], 0, 1
    else:
        shapes = [(1, 2048), (4, 2048), (1, 8192)]
        dtypes, batches, warmup, iters = [torch.bfloat16, torch.float32], [1, 16], 3, 10
    parts = [
        f"Device: {where}. Median of {iters} runs after {warmup} warm-up. "
        "fp32 tl.dot uses the Triton default (TF32 on NVIDIA) unless TRITON_F32_DEFAULT is set "
        f"(now: {__import__('os').environ.get('TRITON_F32_DEFAULT', 'unset')}).",
        "### ssd_chunked: torch vs cuda vs mamba-ssm's mamba_chunk_scan_combined (h = g = 9, p = n = 64)",
        bench_scan(dev, shapes, dtypes, warmup, iters),
        "### ssd_step (decode), bf16",
        bench_step(dev, batches, warmup, iters),
    ]
    if args.distill_tokens and dev.type == "cuda":
        parts += [
            "### One bf16 distillation stage on the embedded teacher",
            bench_distill(args.distill_tokens, "cuda"),
        ]
    body = "\n\n".join(parts)
    print(body)
    if not args.no_append:
        append_section("GPU check: the kernels='cuda' path (bench/gpu_check.sh)", body)


if __name__ == "__main__":
    main()
