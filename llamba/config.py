"""LlambaConfig: the one description of a Llamba model (Llama skeleton, discrete Mamba-2 mixers).

Dimension letters (shared by every package): b batch, l sequence length, d model width (d_model),
h value heads (n_v_heads), g B/C head groups (n_qk_heads), p head dim (headdim), n state size (d_state),
c chunks, k conv width (d_conv), v vocab.
"""

from __future__ import annotations

import dataclasses

from transformers import PreTrainedConfig

from llamba.errors import LlambaError


class ConfigError(LlambaError, ValueError):
    """A config that cannot describe a Llamba model; the message names the field and the fix."""


# Accepted range of each integer field. The upper bounds are far above any Llama (Llama-3-405B: d 16384,
# 126 layers, MLP 53248) yet stop a corrupt config.json from asking for terabytes (chunk_size 1e9 would
# allocate a 10^9 x 10^9 mask per head).
INT_RANGES: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 24),
    "d_model": (1, 1 << 16),
    "n_layer": (1, 1024),
    "intermediate_size": (1, 1 << 18),
    "d_state": (1, 4096),
    "n_v_heads": (1, 4096),
    "n_qk_heads": (1, 4096),
    "expand": (1, 16),
    "d_conv": (1, 64),
    "chunk_size": (1, 4096),
}
BOOL_FIELDS = ("tie_embeddings", "mlp_bias", "bias", "conv_bias")


class LlambaConfig(PreTrainedConfig):
    model_type = "llamba"

    # Llama skeleton (copied from the teacher)
    vocab_size: int = 49152
    d_model: int = 576
    n_layer: int = 30
    intermediate_size: int = 1536  # SwiGLU MLP width
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    mlp_bias: bool = False
    hidden_act: str = "silu"
    # Discrete Mamba-2 mixer (docs/equations.md §M1)
    d_state: int = 64  # N
    n_v_heads: int = 9  # h: value heads
    n_qk_heads: int = 9  # g: B/C heads; h % g == 0 (g < h shares B, C like GQA shares K, V)
    expand: int = 1  # d_inner = expand * d_model
    d_conv: int = 4  # k: depthwise causal conv width over x, B, C
    chunk_size: int = 128  # chunk length of the SSD scan
    activation: str = "identity"  # after the conv: "identity" (Llamba) or "silu"
    bias: bool = False  # in_proj / out_proj bias (when False, a separate z_bias feeds the gate)
    conv_bias: bool = True
    # Provenance for the model card: {"teacher": name, "tokens": budget, "ppl_ratio": student/teacher perplexity}
    distillation: dict | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        kwargs.pop("tie_word_embeddings", None)  # `tie_embeddings` is the one source of truth
        self._read_cartesia_keys(kwargs)
        super().__post_init__(**kwargs)
        self.tie_word_embeddings = self.tie_embeddings
        self.check()

    # Derived sizes -------------------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def headdim(self) -> int:  # p
        return self.d_inner // self.n_v_heads

    @property
    def conv_dim(self) -> int:  # channels of the conv: x, B, C
        return self.d_inner + 2 * self.n_qk_heads * self.d_state

    @property
    def d_in_proj(self) -> int:  # rows of in_proj: x | B | C | z | A_log
        return 2 * self.d_inner + 2 * self.n_qk_heads * self.d_state + self.n_v_heads

    @property
    def num_hidden_layers(self) -> int:  # the name transformers' utilities look for
        return self.n_layer

    @property
    def hidden_size(self) -> int:
        return self.d_model

    def check(self) -> None:
        """Raise ConfigError naming the first inconsistent or out-of-range field."""
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field `{name}` must be a positive integer, got {value!r}")
            if not low <= value <= high:
                raise ConfigError(
                    f"config field `{name}` is {value}, outside the supported range {low}..{high}; "
                    "the config is corrupt or not a Llamba config"
                )
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config field `{name}` must be true or false, got {getattr(self, name)!r}")
        eps = self.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ConfigError(f"config field `norm_eps` must be a number in (0, 1), got {eps!r}")
        if self.d_inner % self.n_v_heads:
            raise ConfigError(
                f"d_inner = expand*d_model = {self.d_inner} is not divisible by n_v_heads = "
                f"{self.n_v_heads}; pick n_v_heads dividing it"
            )
        if self.n_v_heads % self.n_qk_heads:
            raise ConfigError(
                f"n_v_heads = {self.n_v_heads} is not a multiple of n_qk_heads = {self.n_qk_heads}"
            )
        if self.activation not in ("identity", "silu"):
            raise ConfigError(
                f"config field `activation` must be 'identity' or 'silu', got {self.activation!r}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(
                f"config field `hidden_act` must be 'silu' (SwiGLU MLP), got {self.hidden_act!r}"
            )

    # Conversions ---------------------------------------------------------------------------------
    @classmethod
    def from_llama_config(cls, llama, **overrides) -> LlambaConfig:
        """A student config for any Hugging Face LlamaConfig (GQA included).

        Defaults follow the Llamba recipe: one mixer head per teacher query head (n_qk = n_v = heads),
        d_state = the teacher's head_dim, expand 1, conv width 4, chunk 128.
        """
        model_type = getattr(llama, "model_type", None)
        if model_type != "llama":
            raise ConfigError(
                f"teacher architecture is {model_type!r}, not 'llama'; "
                "Llamba distills LlamaForCausalLM teachers only"
            )
        heads = llama.num_attention_heads
        head_dim = getattr(llama, "head_dim", None) or llama.hidden_size // heads
        eos = llama.eos_token_id
        fields = dict(
            vocab_size=llama.vocab_size,
            d_model=llama.hidden_size,
            n_layer=llama.num_hidden_layers,
            intermediate_size=llama.intermediate_size,
            norm_eps=llama.rms_norm_eps,
            tie_embeddings=bool(llama.tie_word_embeddings),
            mlp_bias=bool(getattr(llama, "mlp_bias", False)),
            hidden_act=llama.hidden_act,
            d_state=head_dim,
            n_v_heads=heads,
            n_qk_heads=heads,
            pad_token_id=llama.pad_token_id,
            bos_token_id=llama.bos_token_id,
            eos_token_id=eos,
        )
        fields.update(overrides)
        return cls(**fields)

    def to_cartesia_dict(self) -> dict:
        """The config.json layout of cartesia-ai's released Llamba checkpoints (docs/equations.md §M5)."""
        return {
            "model_type": "llamba",
            "vocab_size": self.vocab_size,
            "tie_embeddings": self.tie_embeddings,
            "pad_vocab_size_multiple": 1,
            "lm_head_bias": False,
            "d_model": self.d_model,
            "n_layer": self.n_layer,
            "resid_dropout": 0.0,
            "norm_epsilon": self.norm_eps,
            "mlp_cfg": {
                "intermediate_size": self.intermediate_size,
                "bias": self.mlp_bias,
                "act_fn": self.hidden_act,
            },
            "ssm_cfg": {
                "d_state": self.d_state,
                "n_v_heads": self.n_v_heads,
                "n_qk_heads": self.n_qk_heads,
                "expand": self.expand,
                "chunk_size": self.chunk_size,
                "activation": self.activation,
                "bias": self.bias,
            },
        }

    def _read_cartesia_keys(self, extra: dict) -> None:
        """cartesia's nested layout (`mlp_cfg`, `ssm_cfg`, `norm_epsilon`, `pad_vocab_size_multiple`) arrives as
        unknown keys: move them onto our flat fields, so AutoConfig / from_pretrained read their directories."""
        if "ssm_cfg" not in extra and "mlp_cfg" not in extra:
            return
        try:
            mlp, ssm = extra.pop("mlp_cfg"), extra.pop("ssm_cfg")
            self.intermediate_size = mlp["intermediate_size"]
            self.mlp_bias = mlp.get("bias", False)
            self.hidden_act = mlp.get("act_fn", "silu")
            self.d_state = ssm["d_state"]
            self.n_v_heads = ssm["n_v_heads"]
            self.n_qk_heads = ssm.get("n_qk_heads", ssm["n_v_heads"])
            self.expand = ssm.get("expand", 1)
            self.chunk_size = ssm.get("chunk_size", 128)
            self.activation = ssm.get("activation", "identity")
            self.bias = ssm.get("bias", False)
        except KeyError as e:
            raise ConfigError(f"cartesia config is missing required key {e.args[0]!r}") from None
        self.norm_eps = extra.pop("norm_epsilon", self.norm_eps)
        multiple = extra.pop("pad_vocab_size_multiple", 1) or 1
        self.vocab_size = ((self.vocab_size + multiple - 1) // multiple) * multiple  # cartesia pads the table
        for unused in ("lm_head_bias", "resid_dropout"):  # always False / 0.0 in their releases
            extra.pop(unused, None)

    @classmethod
    def from_cartesia_dict(cls, raw: dict) -> LlambaConfig:
        """Read cartesia's nested config (`mlp_cfg`, `ssm_cfg`); missing required keys are ConfigErrors."""
        missing = [k for k in ("vocab_size", "d_model", "n_layer", "mlp_cfg", "ssm_cfg") if k not in raw]
        if missing:
            raise ConfigError(f"cartesia config is missing required key {missing[0]!r}")
        return cls(**{k: v for k, v in raw.items() if k != "model_type"})

    def known_keys(self) -> set[str]:
        return {f.name for f in dataclasses.fields(self)} | {
            "architectures",
            "model_type",
            "transformers_version",
            "auto_map",
            "tie_word_embeddings",
            "dtype",
        }


def register_auto_config() -> None:
    """AutoConfig resolves model_type 'llamba' (runs on import; llamba.model registers the model class)."""
    from transformers import AutoConfig

    try:
        AutoConfig.register("llamba", LlambaConfig)
    except ValueError:  # already registered (re-import)
        pass


register_auto_config()
