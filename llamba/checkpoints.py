"""Checkpoint I/O: our Hugging Face layout, cartesia-ai's released Llamba layout, atomic saves, Auto classes.

Both layouts share the weight names (`backbone.layers.{i}.mixer.in_proj.weight`, ...); they differ in
config.json (flat LlambaConfig fields vs cartesia's nested `mlp_cfg` / `ssm_cfg`) and file format
(`model.safetensors`, sharded safetensors, or `pytorch_model.bin`).
"""

from __future__ import annotations

import difflib
import json
import warnings
from pathlib import Path

import torch

from llamba.atomic import atomic_dir, atomic_write
from llamba.card import model_card
from llamba.config import ConfigError, LlambaConfig
from llamba.errors import LlambaError, one_line
from llamba.model import LlambaForCausalLM, register_auto_classes  # noqa: F401  (re-exported)

REQUIRED_FIELDS = (
    "vocab_size",
    "d_model",
    "n_layer",
    "intermediate_size",
    "d_state",
    "n_v_heads",
    "n_qk_heads",
)
CARTESIA_SSM_KEYS = {
    "d_state",
    "n_v_heads",
    "n_qk_heads",
    "expand",
    "chunk_size",
    "activation",
    "bias",
    "d_conv",
    "conv_bias",
}
SAVED_DTYPES = ("float32", "bfloat16", "float16")

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


class CheckpointError(LlambaError, ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the field."""


def load_tokenizer(model_path: str | Path, source: str | Path | None = None):
    """The tokenizer of `source` (a directory), else of the checkpoint, else the embedded teacher's."""
    from transformers import AutoTokenizer

    from llamba.embedded import EmbeddedTeacherMissing, embedded_gguf

    for cand in ([Path(source)] if source else []) + [Path(model_path)]:
        if (cand / "tokenizer.json").is_file() or (cand / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(cand)
        if source and cand == Path(source):
            raise CheckpointError(f"--tokenizer {source} holds no tokenizer.json or tokenizer_config.json")
    try:
        gguf = embedded_gguf()
    except EmbeddedTeacherMissing as e:
        raise CheckpointError(f"no tokenizer in the checkpoint ({e}), or pass --tokenizer DIR") from None
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in DTYPES.values():
            raise CheckpointError(f"unsupported dtype {dtype}; use one of fp32, bf16, fp16")
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; use one of fp32, bf16, fp16")
    return DTYPES[dtype]


def read_config(path: str | Path) -> tuple[LlambaConfig, str]:
    """config.json of either layout -> (LlambaConfig, 'llamba' | 'cartesia')."""
    file = Path(path) / "config.json"
    if not Path(path).exists():
        raise CheckpointError(
            f"{path} does not exist (no config.json); point --model at a Llamba checkpoint directory"
        )
    if not Path(path).is_dir():
        raise CheckpointError(
            f"{path} is a file, not a checkpoint directory; point --model at the directory holding "
            "config.json and the weights"
        )
    if not file.is_file():
        stages = sorted(Path(path).glob("stage[123]/config.json"))
        hint = f" (a distillation run? try --model {stages[-1].parent})" if stages else ""
        raise CheckpointError(
            f"{path} has no config.json; point --model at a Llamba checkpoint directory{hint}"
        )
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise CheckpointError(
            f"{file} is not valid JSON ({where}); re-save or re-download the checkpoint"
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} holds a JSON {type(raw).__name__}, not an object of config fields")
    try:
        if "ssm_cfg" in raw:
            if not isinstance(raw["ssm_cfg"], dict) or not isinstance(raw.get("mlp_cfg", {}), dict):
                raise CheckpointError(f"{file}: `ssm_cfg` and `mlp_cfg` must be JSON objects")
            _refuse_misspelled(file, raw["ssm_cfg"], CARTESIA_SSM_KEYS, "ssm_cfg.")
            return LlambaConfig.from_cartesia_dict(raw), "cartesia"
        if "model_file" in raw:
            raise CheckpointError(
                f"{file} is an MLX export; pass the PyTorch checkpoint it was exported from "
                "(or use it with `llamba chat` / `llamba generate`)"
            )
        if raw.get("model_type") != "llamba":
            raise CheckpointError(
                f"{file}: model_type is {raw.get('model_type')!r}, not 'llamba'; "
                "distill a Llama teacher first (llamba distill) or pass a Llamba checkpoint"
            )
        missing = [k for k in REQUIRED_FIELDS if k not in raw]
        if missing:
            raise CheckpointError(f"{file} is missing required field {missing[0]!r}")
        dtype = raw.get("dtype") or "float32"
        if dtype not in SAVED_DTYPES:
            raise CheckpointError(f"{file}: field `dtype` is {dtype!r}; supported: {', '.join(SAVED_DTYPES)}")
        _refuse_misspelled(file, raw, set(LlambaConfig().to_dict()) | set(REQUIRED_FIELDS))
        cfg = LlambaConfig.from_dict(raw)
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None
    except (TypeError, ValueError) as e:  # a field of the wrong JSON type that transformers rejects
        raise CheckpointError(f"{file}: {one_line(e)}") from None
    unknown = sorted(set(raw) - cfg.known_keys() - set(LlambaConfig().to_dict()))
    if unknown:
        warnings.warn(f"{file}: ignoring unknown config keys {unknown}", stacklevel=3)
    return cfg, "llamba"


def _refuse_misspelled(file: Path, raw: dict, valid: set[str], prefix: str = "") -> None:
    """An unknown key that is one typo away from a Llamba field (`chunk_sise`) would silently fall back to the
    default: refuse it, listing the valid keys. Other unknown keys (Hugging Face extras) are tolerated."""
    known = set(valid) | set(dir(LlambaConfig))
    for key in raw:
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.85)
        if close:
            raise CheckpointError(
                f"{file}: unknown config key {prefix}{key!r} (did you mean {prefix}{close[0]!r}?); "
                f"valid keys: {', '.join(sorted(valid))}"
            )


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a checkpoint directory (safetensors, sharded safetensors, or pytorch_model.bin).
    Returns (tensors by name, file each name came from)."""
    from safetensors.torch import load_file

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files and (path / "pytorch_model.bin").is_file():
        files = [path / "pytorch_model.bin"]
    if not files:
        raise CheckpointError(f"{path} holds no weights (model.safetensors or pytorch_model.bin)")
    weights: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for f in files:
        try:
            part = (
                load_file(f)
                if f.suffix == ".safetensors"
                else torch.load(f, map_location="cpu", weights_only=True)
            )
        except Exception as e:  # truncated or corrupt file: name it, no traceback
            raise CheckpointError(
                f"{f} is corrupt or truncated ({type(e).__name__}); re-save or re-download it"
            ) from None
        weights.update(part)
        origin.update(dict.fromkeys(part, f))
    return weights, origin


def load_model(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    kernels: str = "auto",
) -> LlambaForCausalLM:
    """Load a Llamba checkpoint of either layout. Shape or key mismatches raise CheckpointError."""
    torch_dtype = parse_dtype(dtype)
    config, layout = read_config(path)
    weights, origin = read_weights(path)
    weights = {k.removeprefix("model."): v for k, v in weights.items()} if layout == "cartesia" else weights
    with torch.device("meta"):
        model = LlambaForCausalLM(config)
    expected = model.state_dict()
    if config.tie_embeddings:
        weights.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    for name, tensor in weights.items():
        if name not in expected:
            raise CheckpointError(
                f"{origin.get(name, path)}: unexpected weight {name!r} for this config (is "
                "config.json the one saved with these weights?)"
            )
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{origin.get(name, path)}: weight {name!r} has shape {tuple(tensor.shape)} but "
                f"config.json implies {tuple(expected[name].shape)}"
            )
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise CheckpointError(f"{path}: missing weight {missing[0]!r} ({len(missing)} missing in all)")
    model.load_state_dict(weights, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.backbone.embedding.weight
    model = model.to(device=device, dtype=torch_dtype or next(iter(weights.values())).dtype).eval()
    model.set_kernels(kernels)
    return model


def atomic_save(
    model: LlambaForCausalLM, out_dir: str | Path, tokenizer=None, extra_files: dict | None = None
) -> Path:
    """save_pretrained into a temporary sibling, then rename (llamba.atomic): a crash never leaves a half-written
    checkpoint. extra_files: {name: JSON-serializable} written beside the weights."""
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2))
    return out


def record_distillation(
    path: str | Path,
    teacher: str | None = None,
    tokens: int | None = None,
    ppl_ratio: float | None = None,
    **metrics,
) -> None:
    """Add what is known about a finished distillation to a checkpoint's config.json (`distillation`) and
    regenerate its model card. metrics: more values to keep (the chat report's, CARD_METRICS). Each file is
    replaced atomically; unknown values keep what was recorded."""
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    info = dict(raw.get("distillation") or {})
    for key, value in (("teacher", teacher), ("tokens", tokens), ("ppl_ratio", ppl_ratio), *metrics.items()):
        if value is not None:
            info[key] = value
    raw["distillation"] = info
    config, _ = read_config(path)
    config.distillation = info
    for name, text in (("config.json", json.dumps(raw, indent=2) + "\n"), ("README.md", model_card(config))):
        atomic_write(path / name, text)


def save_cartesia(model: LlambaForCausalLM, out_dir: str | Path) -> Path:
    """Write cartesia's layout (nested config.json + model.safetensors); used to test their loader path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.config.to_cartesia_dict(), indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, out / "model.safetensors")
    return out
