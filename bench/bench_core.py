"""Model-core speed on CPU: Llamba student vs its HF Llama teacher at the SmolLM2-135M shape (issues 2, 15).

Every goal is a ratio measured in one process from interleaved A/B pairs (teacher, student, teacher, ...);
the median pair ratio is reported, so load from other jobs on a shared machine hits both sides alike.

  forward (prefill, last logits) at 512 and 4k      student speed / teacher speed   goals >= 0.8x, >= 1.5x
  training step, seq 512                            teacher fwd + student fwd+bwd (stage 3 KD) vs the
                                                    teacher's own fwd+bwd            goal >= 0.7x
  batch-1 greedy decode                             fraction of the bandwidth limit (bytes read per token /
                                                    measured copy bandwidth)          goal >= 50%
                                                    student/teacher tok/s at 8k, 32k vs the ratio of bytes
                                                    each reads per token (weights + state or KV cache)
  decode speed across contexts 256 .. 32k           spread                            goal <= 10%
  ssd_chunked vs ssd_recurrent at L = 4096          speedup                           goal >= 20x

Levers measured alongside: bf16 weights (when the CPU has AVX512-BF16 or AMX; accuracy vs fp32 printed),
grouped B/C heads (n_qk_heads = the teacher's KV heads), torch.compile of the scan (compile time printed).

Weights are random (speed does not depend on values). Decode at a context uses a KV cache / recurrent state of
that length filled with random values: the teacher's 32k prefill alone would take many minutes here, and the
student's state has the same shape after any number of tokens.

    python bench/bench_core.py                       # full run (~15 min on 2 loaded cores), appends BENCHMARKS.md
    python bench/bench_core.py --quick --no-append   # small sizes, to check the script
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_section, markdown_table  # noqa: E402


def smollm2_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=40000,
    )


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def pairs(fn_teacher, fn_student, reps: int, warmup: bool = True) -> dict:
    """Interleaved pairs (after one warm-up each) -> medians and the median of teacher_time / student_time."""
    if warmup:
        fn_teacher(), fn_student()
    tt, ts = [], []
    for _ in range(reps):
        tt.append(timed(fn_teacher))
        ts.append(timed(fn_student))
    return {
        "teacher_s": statistics.median(tt),
        "student_s": statistics.median(ts),
        "ratio": statistics.median(a / b for a, b in zip(tt, ts, strict=True)),
    }


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once


def copy_bandwidth() -> float:
    """Bytes moved per second (read + write) by a 512 MiB tensor copy, best of 5."""
    src = torch.ones(128 * 2**20)
    dst = torch.empty_like(src)
    best = min(timed(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * src.numel() * 4 / best


# Workloads ------------------------------------------------------------------------------------------------
def prefill_fns(teacher, student, ids):
    def t():
        with torch.inference_mode():
            teacher(ids, logits_to_keep=1)

    def s():
        with torch.inference_mode():
            student(ids, num_last_tokens=1)

    return t, s


def train_fns(teacher, student, ids):
    from llamba.distill.losses import kd_loss

    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)

    def t():  # the teacher's own training step
        teacher.zero_grad(set_to_none=True)
        teacher(ids, labels=ids).loss.backward()

    def s():  # stage 3: frozen teacher forward + student forward + backward of the KD loss
        student.zero_grad(set_to_none=True)
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        kd_loss(student(ids).logits, t_logits, labels=labels).backward()

    return t, s


def teacher_cache(cfg, context: int, dtype):
    from transformers import DynamicCache

    cache = DynamicCache(config=cfg)
    kv, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        cache.update(
            torch.randn(1, kv, context, hd, dtype=dtype), torch.randn(1, kv, context, hd, dtype=dtype), i
        )
    return cache


def student_state(student, context: int):
    state = student.alloc_state(1)
    for t in state.conv + state.ssm:
        t.normal_()
    state.seqlen = context
    return state


def decode_fns(teacher, student, cfg, context: int, tokens: int, teacher_side: bool = True):
    tcache = teacher_cache(cfg, context, teacher.dtype) if teacher_side else None
    sstate = student_state(student, context)

    def t():
        with torch.inference_mode():
            tok = torch.tensor([[1]])
            for _ in range(tokens):
                tok = (
                    teacher(tok, past_key_values=tcache, use_cache=True)
                    .logits[:, -1]
                    .argmax(-1, keepdim=True)
                )
        for layer in tcache.layers:  # back to `context` tokens for the next rep
            layer.keys, layer.values = layer.keys[:, :, :context], layer.values[:, :, :context]

    def s():
        with torch.inference_mode():
            tok = torch.tensor([1])
            for _ in range(tokens):
                tok = student.step(tok, sstate).argmax(-1)

    if tcache is None:
        return None, s, 0, sstate.nbytes()
    kv_bytes = sum(
        x.numel() * x.element_size() for layer in tcache.layers for x in (layer.keys, layer.values)
    )
    return t, s, kv_bytes, sstate.nbytes()


def decode_spread(student, contexts: list[int], tokens: int, reps: int) -> dict[int, float]:
    """Student decode tok/s per context, measured round-robin (256, 8k, 32k, 256, 8k, ...; median per context)
    so that drift over the run (warm-up, clocks, load) hits every context alike."""
    fns = {c: decode_fns(None, student, None, c, tokens, teacher_side=False)[1] for c in contexts}
    for fn in fns.values():
        fn()  # warm-up
    times = {c: [] for c in contexts}
    for _ in range(reps):
        for c, fn in fns.items():
            times[c].append(timed(fn))
    return {c: tokens / statistics.median(t) for c, t in times.items()}


def scan_speedup(length: int, reps: int, chunk: int = 128) -> dict:
    from llamba.ops import ssd_chunked, ssd_recurrent

    g = torch.Generator().manual_seed(0)
    h, p, n = 9, 64, 64
    x = torch.randn(1, length, h, p, generator=g)
    a = -F.softplus(torch.randn(1, length, h, generator=g))
    B, C = torch.randn(1, length, h, n, generator=g), torch.randn(1, length, h, n, generator=g)
    with torch.inference_mode():
        r = pairs(lambda: ssd_recurrent(x, a, B, C), lambda: ssd_chunked(x, a, B, C, chunk), reps)
        prev = pairs(
            lambda: previous_scan(x, a, B, C, chunk, None), lambda: ssd_chunked(x, a, B, C, chunk), reps
        )
        B3, C3 = B[:, :, :3].contiguous(), C[:, :, :3].contiguous()
        prev3 = pairs(
            lambda: previous_scan(x, a, B3, C3, chunk, None), lambda: ssd_chunked(x, a, B3, C3, chunk), reps
        )
    return {
        "recurrent_s": r["teacher_s"],
        "chunked_s": r["student_s"],
        "speedup": r["ratio"],
        "vs_previous": prev["ratio"],
        "vs_previous_g3": prev3["ratio"],
        "inputs": (x, a, B, C),
    }


def previous_scan(x, log_decay, B, C, chunk_size, initial_state):
    """The scan before issue 15 (head-major permutes, exact segsum, repeated B/C heads), for the A/B row."""
    from llamba.ops import expand_groups, segsum

    b, l, h, p = x.shape
    n = B.shape[-1]
    q = chunk_size
    pad = (-l) % q
    c = (l + pad) // q

    def chunked(t):  # (b, l, h, e) -> (b, h, c, q, e), zero-padded; fp32
        t = F.pad(t.float(), (0, 0, 0, 0, 0, pad))
        return t.view(b, c, q, h, t.shape[-1]).permute(0, 3, 1, 2, 4)

    # Padding with x = 0 and log_decay = 0 (a = 1) leaves the final state untouched.
    X = chunked(x)  # (b, h, c, q, p)
    Bc, Cc = chunked(expand_groups(B, h, 2)), chunked(expand_groups(C, h, 2))  # (b, h, c, q, n)
    A = F.pad(log_decay.float(), (0, 0, 0, pad)).view(b, c, q, h).permute(0, 3, 1, 2)  # (b, h, c, q)
    A_cum = torch.cumsum(A, dim=-1)

    # 1. Inside each chunk: y = (L o C B^T) X, the quadratic "attention" form.
    scores = (Cc @ Bc.transpose(-1, -2)) * torch.exp(segsum(A))  # (b, h, c, q, q)
    y = scores @ X  # (b, h, c, q, p)

    # 2. The state each chunk leaves behind from its own inputs, kept as (n, p) for the matmuls.
    decay_to_end = torch.exp(A_cum[..., -1:] - A_cum)[..., None]  # (b, h, c, q, 1)
    chunk_states = (Bc * decay_to_end).transpose(-1, -2) @ X  # (b, h, c, n, p)

    # 3. Pass states across chunks: S_{c+1} = exp(sum of A over chunk c) S_c + chunk_states_c.
    if initial_state is None:
        init = x.new_zeros(b, h, 1, n, p, dtype=torch.float32)
    else:
        init = initial_state.float().transpose(-1, -2)[:, :, None]  # (b, h, 1, n, p)
    states = torch.cat([init, chunk_states], dim=2)  # (b, h, c+1, n, p)
    chunk_decay = torch.exp(segsum(F.pad(A_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = (chunk_decay @ states.flatten(3)).view(b, h, c + 1, n, p)
    entering, final_state = states[:, :, :-1], states[:, :, -1].transpose(-1, -2)  # final: (b, h, p, n)

    # 4. Contribution of the entering state to every position of its chunk.
    y = y + (Cc * torch.exp(A_cum)[..., None]) @ entering  # (b, h, c, q, p)
    y = y.permute(0, 2, 3, 1, 4).reshape(b, c * q, h, p)[:, :l]
    return y.to(x.dtype), final_state.contiguous()


def compiled_scan(inputs, reps: int, chunk: int = 128) -> dict:
    import llamba.ops as ops

    x, a, B, C = inputs
    ops.use_compile(True)
    try:
        with torch.inference_mode():
            t_compile = timed(lambda: ops.ssd_chunked(x, a, B, C, chunk))
            ok = ops._COMPILE["on"]

            def eager():
                ops.use_compile(False)
                ops.ssd_chunked(x, a, B, C, chunk)

            def comp():
                ops.use_compile(True)
                ops.ssd_chunked(x, a, B, C, chunk)

            r = pairs(eager, comp, reps) if ok else None
    finally:
        ops.use_compile(False)
    return {"compile_s": t_compile, "ok": ok, **(r or {})}


def compiled_decode(student, tokens: int, reps: int) -> dict:
    """torch.compile (inductor, CPU) of one whole decode step (30 layers + head) vs eager `student.step`, both on
    a state of 256 tokens: the model's own step graph (`LlambaForCausalLM.use_compiled_step`), which takes the
    state tensors as arguments and writes the new state back in place, so one graph serves every step."""
    state = student_state(student, 256)
    compiled = torch.compile(
        student._step_graph, dynamic=False
    )  # what `use_compiled_step` / `--compile` runs

    def eager():
        with torch.inference_mode():
            tok = torch.tensor([1])
            for _ in range(tokens):
                tok = student.step(tok, state).argmax(-1)

    def comp():
        with torch.inference_mode():
            tok = torch.tensor([1])
            for _ in range(tokens):
                tok = compiled(tok, state.conv, state.ssm).argmax(-1)

    with torch.inference_mode():
        ref = student.step(torch.tensor([1]), state.clone())
        twin = state.clone()
        try:
            t_compile = timed(lambda: compiled(torch.tensor([1]), twin.conv, twin.ssm))
            got = compiled(torch.tensor([1]), state.clone().conv, state.clone().ssm)
        except Exception as e:  # noqa: BLE001 - a lever that does not compile is reported, not fatal
            return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    rel = ((got - ref).norm() / ref.norm()).item()
    return {"ok": True, "compile_s": t_compile, "rel_err": rel, **pairs(eager, comp, reps)}


def bf16_accuracy(student_fp32, student_bf16, ids) -> dict:
    with torch.inference_mode():
        ref = student_fp32(ids).logits
        low = student_bf16(ids).logits.float()
    rel = ((low - ref).norm() / ref.norm()).item()
    agree = (low.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return {"rel_err": rel, "argmax_agree": agree}


# Main -----------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="interleaved pairs per measurement (median reported)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 8192, 32768])
    ap.add_argument("--decode", type=int, default=4, help="tokens per timed decode run")
    ap.add_argument("--seqs", type=int, nargs="+", default=[512, 4096], help="prefill lengths")
    ap.add_argument("--train-seq", type=int, default=512)
    ap.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile lever (~1 min to compile)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="small sizes: checks the script, numbers mean little"
    )
    ap.add_argument(
        "--no-append", action="store_true", help="print only; do not append to bench/results/HISTORY.md"
    )
    args = ap.parse_args()
    if args.quick:
        args.reps, args.contexts, args.decode, args.seqs, args.train_seq = 1, [64, 512], 2, [64, 2048], 64

    from transformers import LlamaForCausalLM

    from llamba.config import LlambaConfig
    from llamba.model import LlambaForCausalLM

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' past_key_values rename
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    flags = cpu_flags()
    has_bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    load_start = loadavg()
    print(
        f"threads {args.threads}, load {load_start}, avx512_bf16 {'avx512_bf16' in flags}, "
        f"amx_bf16 {'amx_bf16' in flags}",
        flush=True,
    )
    cfg = smollm2_llama_config()
    teacher = LlamaForCausalLM(cfg).eval()
    student = LlambaForCausalLM(LlambaConfig.from_llama_config(cfg)).eval()
    grouped = LlambaForCausalLM(
        LlambaConfig.from_llama_config(cfg, n_qk_heads=cfg.num_key_value_heads)
    ).eval()
    vocab = cfg.vocab_size
    goals, rows_lever = [], []

    def goal(name, measured, target, met, detail=""):
        goals.append([name, measured, target, "met" if met else "**missed**", detail])
        print(f"  {name}: {measured} [goal {target}] {'met' if met else 'MISSED'} {detail}", flush=True)

    def lever(name, effect, note=""):
        rows_lever.append([name, effect, note])
        print(f"  {rows_lever[-1]}", flush=True)

    # Scan
    scan_len = 4096 if not args.quick else 512
    scan = scan_speedup(scan_len, args.reps)
    goal(
        f"`ssd_chunked` / `ssd_recurrent`, L = {scan_len}",
        f"{scan['speedup']:.1f}x",
        ">= 20x",
        scan["speedup"] >= 20,
        f"{scan['chunked_s'] * 1e3:.0f} ms vs {scan['recurrent_s']:.2f} s",
    )
    lever(
        f"scan rewrite vs the previous torch scan, L = {scan_len}",
        f"{scan['vs_previous']:.2f}x",
        f"{scan['vs_previous_g3']:.2f}x with 3 B/C groups (no repeat of B, C)",
    )
    if not args.no_compile:
        comp = compiled_scan(scan["inputs"], args.reps)
        if comp["ok"]:
            rows_lever.append(
                [
                    f"torch.compile of the scan, L = {scan_len}",
                    f"{comp['ratio']:.2f}x eager",
                    f"first call (compile) {comp['compile_s']:.0f} s",
                ]
            )
        else:
            rows_lever.append(["torch.compile of the scan", "compile failed: eager fallback", ""])
        print(f"  {rows_lever[-1]}", flush=True)

    # Prefill
    for seq in args.seqs:
        ids = torch.randint(0, vocab, (1, seq))
        long = seq >= 2048
        r = pairs(
            *prefill_fns(teacher, student, ids), max(1, args.reps - 1) if long else args.reps, warmup=not long
        )
        target = 1.5 if seq >= 4096 else 0.8
        goal(
            f"forward (prefill), seq {seq}",
            f"{r['ratio']:.2f}x",
            f">= {target}x",
            r["ratio"] >= target,
            f"{seq / r['student_s']:.0f} vs {seq / r['teacher_s']:.0f} tok/s",
        )
        if seq >= 2048:
            continue
        rg = pairs(*prefill_fns(teacher, grouped, ids), args.reps)
        lever(
            f"grouped B/C (n_qk_heads = 3): forward seq {seq} vs teacher",
            f"{rg['ratio']:.2f}x",
            f"default student {r['ratio']:.2f}x in the same run",
        )

    # Training step
    ids = torch.randint(0, vocab, (1, args.train_seq))
    teacher.train()
    student.train()
    r = pairs(*train_fns(teacher, student, ids), args.reps)
    if has_bf16:  # what `llamba distill` runs on such a CPU (precision auto): both sides under bf16 autocast
        t_fn, s_fn = train_fns(teacher, student, ids)

        def under_autocast(fn):
            def run():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    fn()

            return run

        rb = pairs(under_autocast(t_fn), under_autocast(s_fn), args.reps)
        lever(
            f"training step (stage 3), seq {args.train_seq}, both under bf16 autocast (distill's "
            "default on this CPU)",
            f"{rb['ratio']:.2f}x the teacher's fwd+bwd",
            f"{rb['student_s']:.2f} s vs {rb['teacher_s']:.2f} s; fp32 {r['ratio']:.2f}x",
        )
    teacher.eval()
    student.eval()
    teacher.zero_grad(set_to_none=True)
    student.zero_grad(set_to_none=True)
    goal(
        f"training step (stage 3), seq {args.train_seq}",
        f"{r['ratio']:.2f}x",
        ">= 0.7x",
        r["ratio"] >= 0.7,
        f"{r['student_s']:.2f} s vs teacher fwd+bwd {r['teacher_s']:.2f} s",
    )

    # torch.compile of the whole student (what `llamba distill --compile` runs in stage 3), teacher eager
    if not args.no_compile:
        comp_student = torch.compile(student, dynamic=False)
        seq = args.seqs[0]
        ids = torch.randint(0, vocab, (1, seq))
        t_fn, s_fn = prefill_fns(teacher, comp_student, ids)
        compile_s = timed(s_fn)  # the first call compiles
        r = pairs(t_fn, s_fn, args.reps)
        lever(
            f"torch.compile of the whole student: forward seq {seq} vs the teacher (eager)",
            f"{r['ratio']:.2f}x",
            f"{seq / r['student_s']:.0f} vs {seq / r['teacher_s']:.0f} tok/s; first call (compile) {compile_s:.0f} s",
        )
        ids = torch.randint(0, vocab, (1, args.train_seq))
        teacher.train()
        student.train()
        t_fn, s_fn = train_fns(teacher, comp_student, ids)
        compile_s = timed(s_fn)
        r = pairs(t_fn, s_fn, args.reps)
        lever(
            f"torch.compile of the whole student: training step (stage 3), seq {args.train_seq}, fp32",
            f"{r['ratio']:.2f}x the teacher's fwd+bwd",
            f"{r['student_s']:.2f} s vs {r['teacher_s']:.2f} s; first call (compile) {compile_s:.0f} s",
        )
        teacher.eval()
        student.eval()
        teacher.zero_grad(set_to_none=True)
        student.zero_grad(set_to_none=True)
        del comp_student

    # Decode
    bw = copy_bandwidth()
    s_w, t_w = param_bytes(student), param_bytes(teacher)
    decode_rows, s_speeds = [], []
    for context in args.contexts:
        t_fn, s_fn, kv_bytes, state_bytes = decode_fns(teacher, student, cfg, context, args.decode)
        r = pairs(t_fn, s_fn, args.reps)
        s_tok, t_tok = args.decode / r["student_s"], args.decode / r["teacher_s"]
        s_bytes, t_bytes = s_w + state_bytes, t_w + kv_bytes
        s_speeds.append(s_tok)
        decode_rows.append(
            [
                context,
                f"{s_tok:.1f}",
                f"{t_tok:.1f}",
                f"{r['ratio']:.2f}x",
                f"{t_bytes / s_bytes:.2f}x",
                f"{state_bytes / 2**20:.1f}",
                f"{kv_bytes / 2**20:.0f}",
                f"{100 * s_tok * s_bytes / bw:.0f}%",
                f"{100 * t_tok * t_bytes / bw:.0f}%",
            ]
        )
        print("  decode", decode_rows[-1], flush=True)
        if context >= 8192:
            goal(
                f"decode student/teacher at {context}",
                f"{r['ratio']:.2f}x",
                f">= bytes ratio {t_bytes / s_bytes:.2f}x",
                r["ratio"] >= t_bytes / s_bytes,
            )
        del t_fn, s_fn
    frac = statistics.median(s_speeds) * (s_w + student.alloc_state(1).nbytes()) / bw
    goal(
        "batch-1 decode, fraction of bandwidth limit (fp32)",
        f"{100 * frac:.0f}%",
        ">= 50%",
        frac >= 0.5,
        f"limit {bw / (s_w + student.alloc_state(1).nbytes()):.1f} tok/s at {bw / 1e9:.1f} GB/s copy",
    )
    rr = decode_spread(student, args.contexts, 4 * args.decode, args.reps)
    spread = (max(rr.values()) - min(rr.values())) / max(rr.values())
    paired = (max(s_speeds) - min(s_speeds)) / max(s_speeds)
    goal(
        f"decode speed spread, contexts {args.contexts[0]}..{args.contexts[-1]}",
        f"{100 * spread:.1f}%",
        "<= 10%",
        spread <= 0.1,
        "round-robin over contexts: " + " / ".join(f"{v:.1f}" for v in rr.values()) + " tok/s "
        f"(in the paired runs above, one context after another: {100 * paired:.1f}%); state size constant",
    )

    # bf16 lever
    if has_bf16:
        student_bf16 = LlambaForCausalLM(student.config).eval()
        student_bf16.load_state_dict(student.state_dict())
        student_bf16.to(torch.bfloat16)
        acc_ids = torch.randint(0, vocab, (1, 64))
        acc = bf16_accuracy(student, student_bf16, acc_ids)
        teacher_bf16 = LlamaForCausalLM(cfg).eval()
        teacher_bf16.load_state_dict(teacher.state_dict())
        acc_t = bf16_accuracy(teacher, teacher_bf16.to(torch.bfloat16), acc_ids)
        del teacher_bf16
        _, s32, _, _ = decode_fns(teacher, student, cfg, 256, args.decode)
        _, s16, _, sb = decode_fns(teacher, student_bf16, cfg, 256, args.decode)
        r = pairs(s32, s16, args.reps)
        b16 = param_bytes(student_bf16) + sb
        tok16 = args.decode / r["student_s"]
        rows_lever.append(
            [
                "bf16 weights (AVX512-BF16 present), decode",
                f"{r['ratio']:.2f}x fp32",
                f"{tok16:.1f} tok/s = {100 * tok16 * b16 / bw:.0f}% of the bf16 bandwidth limit; logits "
                f"rel err {acc['rel_err']:.1e}, argmax agreement {100 * acc['argmax_agree']:.0f}% (teacher in bf16: "
                f"{acc_t['rel_err']:.1e}, {100 * acc_t['argmax_agree']:.0f}%; random weights)",
            ]
        )
        ids = torch.randint(0, vocab, (1, args.seqs[0]))
        _, p32 = prefill_fns(teacher, student, ids)
        _, p16 = prefill_fns(teacher, student_bf16, ids)
        r = pairs(p32, p16, args.reps)
        rows_lever.append([f"bf16 weights, forward seq {args.seqs[0]}", f"{r['ratio']:.2f}x fp32", ""])
        print(f"  {rows_lever[-2]}\n  {rows_lever[-1]}", flush=True)
    else:
        rows_lever.append(["bf16 weights", "not measured", "CPU has neither AVX512-BF16 nor AMX: fp32"])

    if not args.no_compile:
        cd = compiled_decode(student, args.decode, args.reps)
        if cd["ok"]:
            tokc = args.decode / cd["student_s"]
            rows_lever.append(
                [
                    "torch.compile of the whole decode step (fp32, context 256)",
                    f"{cd['ratio']:.2f}x eager",
                    f"{tokc:.1f} tok/s = {100 * tokc * (s_w + student.alloc_state(1).nbytes()) / bw:.0f}% of "
                    f"the bandwidth limit; compile {cd['compile_s']:.0f} s; logits rel err "
                    f"{cd['rel_err']:.1e} vs eager",
                ]
            )
        else:
            rows_lever.append(["torch.compile of the whole decode step", "compile failed", cd["error"]])
        print(f"  {rows_lever[-1]}", flush=True)

    per_layer = [
        (m.mixer.in_proj.weight.numel() + m.mixer.out_proj.weight.numel()) / 1e6
        for m in (student.backbone.layers[0], grouped.backbone.layers[0])
    ]
    attn = teacher.model.layers[0].self_attn
    t_mix = sum(lin.weight.numel() for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)) / 1e6
    rows_lever.append(
        [
            "mixer weights per layer (in_proj + out_proj)",
            f"{per_layer[0]:.2f}M default, {per_layer[1]:.2f}M grouped",
            f"teacher q/k/v/o {t_mix:.2f}M",
        ]
    )

    load_end = loadavg()
    try:  # 1-minute load averages at start and end
        peak = max(float(load_start.split()[0]), float(load_end.split()[0]))
    except (IndexError, ValueError):
        peak = float("inf")
    busy = "no other job was running" if peak <= (os.cpu_count() or 1) + 0.5 else "the machine was shared"
    head = (
        f"CPU flags: avx512_bf16 {'avx512_bf16' in flags}, amx_bf16 {'amx_bf16' in flags}; {args.threads} "
        f"threads; load average {load_start} at start, {load_end} at end ({busy}: ratios from "
        f"interleaved pairs, median of {args.reps} (of {max(1, args.reps - 1)} at seq >= 2048), matter more than absolute times). Random weights at the "
        f"SmolLM2-135M shape; fp32 unless stated. Copy bandwidth {bw / 1e9:.1f} GB/s (read + write of 512 MiB); "
        f"bytes per decoded token = weights + state (student) or weights + KV cache (teacher); decode contexts "
        f"use a random state / KV cache of that length."
    )
    body = "\n\n".join(
        [
            head,
            markdown_table(["goal", "measured", "target", "", "detail"], goals),
            markdown_table(
                [
                    "context",
                    "Llamba tok/s",
                    "Llama+KV tok/s",
                    "ratio",
                    "bytes ratio (teacher/student)",
                    "Llamba state MB",
                    "Llama KV MB",
                    "Llamba % of bw limit",
                    "Llama % of bw limit",
                ],
                decode_rows,
            ),
            markdown_table(["lever", "effect", "note"], rows_lever),
        ]
    )
    print("\n" + body)
    if not args.no_append:
        append_section("Model core speed: prefill, training step, decode, scan (CPU, issue 15)", body)


if __name__ == "__main__":
    main()
