"""PyTorch Llamba checkpoint (ours or cartesia's layout) -> MLX model directory.

The output loads with `export.mlx_generate.load(dir)` and, unchanged, with mlx-lm:
`mlx_lm.load(dir, trust_remote_code=True)` (config.json names `model_file`, a copy of `mlx_llamba.py`).

    DIR/config.json          LlambaConfig fields + model_type, model_file, quantization (when quantized)
    DIR/model.safetensors    weights renamed and reshaped by `mlx_llamba.sanitize`, metadata format=mlx
    DIR/mlx_llamba.py        the MLX model (exec'd by mlx-lm)
    DIR/tokenizer*.json, chat_template.jinja ...   from the checkpoint, else the embedded SmolLM2 teacher's

DIR appears at once, complete (written into a temporary sibling, then renamed), so a killed export leaves nothing
that looks finished.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llamba.atomic import atomic_dir
from llamba.errors import LlambaError

DTYPES = ("float16", "bfloat16", "float32")
Q_BITS = (4, 8)
Q_GROUP_SIZES = (32, 64, 128)
MODEL_FILE = "mlx_llamba.py"


class ExportError(LlambaError, ValueError):
    """Bad input to the exporter or loader; the message is one line naming the fix."""


def sanitize(weights: dict, config) -> dict:
    """PyTorch names/shapes -> MLX model's (see `mlx_llamba.sanitize`). weights: {name: mx.array};
    config: a LlambaConfig, a config dict or ModelArgs."""
    from llamba.export import mlx_llamba

    return mlx_llamba.sanitize(weights, model_args(config))


def model_args(config):
    """LlambaConfig | dict | ModelArgs -> mlx_llamba.ModelArgs."""
    from llamba.export import mlx_llamba

    if isinstance(config, mlx_llamba.ModelArgs):
        return config
    raw = config if isinstance(config, dict) else config.to_dict()
    return mlx_llamba.ModelArgs.from_dict({**raw, "model_type": "llamba"})


def convert(
    model_path: str | Path,
    out_dir: str | Path,
    q_bits: int | None = None,
    q_group_size: int = 64,
    dtype: str = "float16",
    tokenizer: str | Path | None = None,
) -> Path:
    """Export a Llamba checkpoint directory to an MLX model directory and return its path.

    q_bits: None (no quantization), 4 or 8 (affine, `mlx.nn.quantize`, group size q_group_size, which must divide
    every quantized layer's input width); norms, conv, D, z_bias and the decay projection stay in `dtype`."""
    from llamba.checkpoints import CheckpointError, read_config

    model_path, out = Path(model_path), Path(out_dir)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if q_bits is not None and q_bits not in Q_BITS:
        raise ExportError(f"--q-bits must be 4 or 8, got {q_bits}")
    if q_group_size not in Q_GROUP_SIZES:
        raise ExportError(f"--q-group-size must be one of 32, 64, 128, got {q_group_size}")
    try:
        config, _ = read_config(model_path)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    if q_bits is not None:
        check_group_size(config, q_group_size)
    check_out(out)
    return _convert(model_path, out, q_bits, q_group_size, dtype, tokenizer)


def quantized_widths(config) -> dict[str, int]:
    """Input width of each kind of layer that quantization touches (all but norms, conv, D, z_bias, a_proj)."""
    return {
        "embedding, in_proj, gate_proj, up_proj, lm_head": config.d_model,
        "out_proj": config.d_inner,
        "down_proj": config.intermediate_size,
    }


def check_group_size(config, group_size: int) -> None:
    """Every quantized layer is quantized in groups along its input width, so the group size must divide each
    width; otherwise only some layers would be quantized while config.json claims all are."""
    bad = {name: w for name, w in quantized_widths(config).items() if w % group_size}
    if bad:
        ok = [str(g) for g in Q_GROUP_SIZES if all(w % g == 0 for w in quantized_widths(config).values())]
        names = "; ".join(f"{name}: {w}" for name, w in bad.items())
        fix = f"use --q-group-size {' or '.join(ok)}" if ok else "export without --q-bits"
        raise ExportError(
            f"--q-group-size {group_size} does not divide the input width of every quantized layer "
            f"({names}); {fix}"
        )


def check_out(out: Path) -> None:
    """Check that --out can become the export directory before any work: it is new or an empty directory, and
    can be created (probed by creating and removing it; the export itself is written by `atomic_dir`)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; choose a new directory")
    if out.is_dir():
        if (out / "config.json").is_file() and not (out / "tokenizer_config.json").is_file():
            raise ExportError(
                f"--out {out} holds an unfinished export (no tokenizer: interrupted?); delete it and re-run"
            )
        if any(out.iterdir()):
            raise ExportError(f"--out {out} exists and is not empty; choose a new --out (or delete it)")
        return
    top = out
    while not top.parent.exists():
        top = top.parent
    if not top.parent.is_dir():
        raise ExportError(f"--out {out}: {top.parent} is a file, not a directory; choose another --out")
    try:
        out.mkdir(parents=True)
    except OSError as e:
        raise ExportError(
            f"--out {out} cannot be created ({(e.strerror or type(e).__name__).lower()}); "
            "choose a writable directory"
        ) from None
    shutil.rmtree(top)


def _convert(
    model_path: Path,
    out: Path,
    q_bits: int | None,
    q_group_size: int,
    dtype: str,
    tokenizer: str | Path | None,
) -> Path:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from llamba.checkpoints import CheckpointError, load_model, load_tokenizer
    from llamba.export import mlx_llamba

    try:
        torch_model = load_model(model_path, dtype="float32", kernels="torch")
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    config = torch_model.config
    args = model_args(config)
    try:
        tok = load_tokenizer(model_path, tokenizer)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    if len(tok) > args.vocab_size:
        raise ExportError(
            f"the tokenizer has {len(tok)} tokens but the model's vocab_size is {args.vocab_size}; "
            "pass the tokenizer it was trained with (--tokenizer DIR)"
        )

    target = getattr(mx, dtype)
    weights = {
        k: mx.array(v.detach().float().numpy()).astype(target) for k, v in torch_model.state_dict().items()
    }
    del torch_model
    model = mlx_llamba.Model(args)
    model.load_weights(list(sanitize(weights, args).items()), strict=True)
    mlx_config = {k: getattr(args, k) for k in args.__dataclass_fields__}
    mlx_config |= {
        "model_file": MODEL_FILE,
        "eos_token_id": config.eos_token_id,
        "bos_token_id": config.bos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": dtype,
    }
    if q_bits is not None:
        nn.quantize(
            model,
            group_size=q_group_size,
            bits=q_bits,
            class_predicate=lambda p, m: mlx_llamba.quant_predicate(p, m, q_group_size),
        )
        quant = {"group_size": q_group_size, "bits": q_bits, "mode": "affine"}
        mlx_config |= {"quantization": quant, "quantization_config": quant}

    # Everything goes into a temporary sibling that is renamed to `out` at the end (llamba.atomic): a kill
    # mid-export leaves no `out` (only the temporary, removed by the next export), never a half directory.
    for stale in out.parent.glob(f".{out.name}.tmp-*") if out.parent.is_dir() else ():
        shutil.rmtree(stale, ignore_errors=True)
    try:
        with atomic_dir(out) as tmp:
            mx.save_safetensors(
                str(tmp / "model.safetensors"),
                dict(tree_flatten(model.parameters())),
                metadata={"format": "mlx"},
            )
            (tmp / "config.json").write_text(json.dumps(mlx_config, indent=2) + "\n")
            shutil.copyfile(Path(mlx_llamba.__file__), tmp / MODEL_FILE)
            tok.save_pretrained(tmp)
            if tok.chat_template and not (tmp / "chat_template.jinja").exists():
                (tmp / "chat_template.jinja").write_text(tok.chat_template)
    except (NotADirectoryError, PermissionError, FileNotFoundError) as e:
        raise ExportError(
            f"--out {out}: cannot write there ({type(e).__name__}: {e.strerror or e}); "
            "choose a writable directory path"
        ) from None
    return out


def export_complete(out_dir: str | Path) -> bool:
    """True when out_dir is a finished export (every file convert() writes is there)."""
    out = Path(out_dir)
    return all((out / f).is_file() for f in ("config.json", "model.safetensors", MODEL_FILE)) and (
        (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    )
