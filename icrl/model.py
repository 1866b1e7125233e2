"""Algorithm Distillation transformer with optional n-gram layers (Zisman et al.) and a permuted-mask control.

One token per transition: token t = Emb(a_{t-1}) + Emb(r_{t-1}) + Emb(s_t) + Emb(pos t) (a sum of embeddings
is a concat followed by a Linear); at a history start a_{t-1} and r_{t-1} are pad ids. With ``episode_marker``
the token also gets Emb_start(episode_start_t), a learned embedding of a per-token flag that is 1 on the first
token of every episode; a_{t-1}, r_{t-1} there stay the previous episode's last action and reward (in
Key-to-Door that is where the door reward lives). Causal, pre-norm; the head predicts a_t at every position.
Dimensions: b batch, l sequence length (transitions in the window), d model width.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from llamba.icrl.ngram import match_keys, ngram_attention, permuted_attention


@dataclass
class ADConfig:
    num_states: int = 81
    num_actions: int = 5
    num_rewards: int = 2
    seq_len: int = 80  # transitions in the context window
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.1  # residual dropout
    attn_dropout: float = 0.1
    emb_dropout: float = 0.1
    ngram_layers: list[int] = field(
        default_factory=list
    )  # block indices that are n-gram layers ([] = plain AD)
    ngram_orders: list[int] = field(default_factory=lambda: [1])  # one fixed head per order, summed
    ngram_key: str = "state"  # "state" or "sar"
    ngram_permuted: bool = False  # control: same sparsity, random causal positions
    # "cell": one embedding per cell index; "rowcol": Emb(row) + Emb(col) of the square grid, so a goal cell
    # never seen as a goal in training still shares its row and column features with seen ones
    state_emb: str = "cell"
    # True: forward() takes an ``episode_start`` flag per token (1 on the first token of every episode), added to
    # the token through its own learned embedding, so the model sees where episodes begin (Key-to-Door episodes
    # have random starts and lengths). It is an extra input: a_{t-1}, r_{t-1} of an episode's first token still
    # carry the previous episode's last step (the door reward). False: no flag and no extra parameters.
    episode_marker: bool = False

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})"
            )
        if any(not 0 <= i < self.n_layers for i in self.ngram_layers):
            raise ValueError(
                f"model.ngram_layers {self.ngram_layers} must be block indices in [0, {self.n_layers})"
            )
        if any(n < 1 for n in self.ngram_orders) or not self.ngram_orders:
            raise ValueError(
                f"model.ngram_orders {self.ngram_orders} must be a non-empty list of orders >= 1"
            )
        if self.ngram_key not in ("state", "sar"):
            raise ValueError(f"model.ngram_key must be 'state' or 'sar', got {self.ngram_key!r}")
        if self.state_emb not in ("cell", "rowcol"):
            raise ValueError(f"model.state_emb must be 'cell' or 'rowcol', got {self.state_emb!r}")
        if self.state_emb == "rowcol" and math.isqrt(self.num_states) ** 2 != self.num_states:
            raise ValueError(f"model.state_emb='rowcol' needs a square grid; num_states={self.num_states}")
        for name in ("dropout", "attn_dropout", "emb_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be in [0, 1)")


class MLP(nn.Module):
    def __init__(self, d: int, ratio: int, dropout: float):
        super().__init__()
        self.fc, self.proj, self.drop = nn.Linear(d, ratio * d), nn.Linear(ratio * d, d), nn.Dropout(dropout)

    def forward(self, x):  # x: (b, l, d)
        return self.drop(self.proj(F.gelu(self.fc(x))))


class AttentionBlock(nn.Module):
    """Pre-norm causal self-attention + MLP."""

    def __init__(self, cfg: ADConfig):
        super().__init__()
        d, self.h = cfg.d_model, cfg.n_heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.attn_dropout, self.drop = cfg.attn_dropout, nn.Dropout(cfg.dropout)
        self.mlp = MLP(d, cfg.mlp_ratio, cfg.dropout)

    def forward(self, x, a=None):  # x: (b, l, d); a unused (same signature as NGramBlock)
        b, l, d = x.shape
        q, k, v = (
            self.qkv(self.norm1(x)).view(b, l, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        )  # (b, h, l, p)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.attn_dropout if self.training else 0.0
        )
        x = x + self.drop(self.out(y.transpose(1, 2).reshape(b, l, d)))
        return x + self.mlp(self.norm2(x))


class NGramBlock(nn.Module):
    """NGL(h) = h + MLP[ W1 h' + sum_n W2^(n) (A^(n) h') ], h' = Norm(h)   (ICRL paper Eqs. 2-3, pre-norm).
    A^(n) is fixed (no gradient); only W1, W2^(n) and the MLP learn."""

    def __init__(self, cfg: ADConfig):
        super().__init__()
        d = cfg.d_model
        self.norm, self.w1 = nn.LayerNorm(d), nn.Linear(d, d)
        self.w2 = nn.ModuleList(nn.Linear(d, d) for _ in cfg.ngram_orders)
        self.mlp = MLP(d, cfg.mlp_ratio, cfg.dropout)

    def forward(self, x, a):  # x: (b, l, d), a: (k, b, l, l) one matrix per order
        hn = self.norm(x)
        y = self.w1(hn)
        for w2, a_n in zip(self.w2, a, strict=True):
            y = y + w2(a_n @ hn)  # (b, l, l) @ (b, l, d)
        return x + self.mlp(y)


class ADTransformer(nn.Module):
    def __init__(self, cfg: ADConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.size = math.isqrt(cfg.num_states)
        if cfg.state_emb == "rowcol":
            self.emb_row, self.emb_col = nn.Embedding(self.size, d), nn.Embedding(self.size, d)
        else:
            self.emb_s = nn.Embedding(cfg.num_states, d)
        self.emb_a = nn.Embedding(cfg.num_actions + 1, d)  # + pad at a history start
        self.emb_r = nn.Embedding(cfg.num_rewards + 1, d)  # + pad
        self.emb_pos = nn.Embedding(cfg.seq_len, d)
        self.emb_drop = nn.Dropout(cfg.emb_dropout)
        self.blocks = nn.ModuleList(
            NGramBlock(cfg) if i in cfg.ngram_layers else AttentionBlock(cfg) for i in range(cfg.n_layers)
        )
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, cfg.num_actions)
        if cfg.episode_marker:  # registered last: the other parameters draw the same init as without it
            self.emb_start = nn.Embedding(2, d)  # 0: inside an episode, 1: first token of an episode
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2 style scaled init of residual projections
            if name.endswith(("out.weight", "proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def embed_states(self, states):  # (b, l) cell indices -> (b, l, d)
        if self.cfg.state_emb == "rowcol":
            return self.emb_row(states // self.size) + self.emb_col(states % self.size)
        return self.emb_s(states)

    def ngram_matrices(self, states, prev_actions, prev_rewards) -> torch.Tensor:
        """-> (k, b, l, l) fixed successor matrices, one per order (permuted in the control variant)."""
        c = self.cfg
        keys = match_keys(states, prev_actions, prev_rewards, c.ngram_key, c.num_states, c.num_rewards)
        mats = [ngram_attention(keys, n) for n in c.ngram_orders]
        if c.ngram_permuted:
            mats = [permuted_attention(m) for m in mats]
        return torch.stack(mats)

    def forward(self, states, prev_actions, prev_rewards, episode_start=None):
        """states, prev_actions, prev_rewards: (b, l) ints, l <= seq_len; episode_start: (b, l) bool, True on the
        first token of every episode (required with ``episode_marker``, refused without it)
        -> action logits (b, l, num_actions)."""
        l = states.shape[1]
        if l > self.cfg.seq_len:
            raise ValueError(f"sequence of {l} transitions is longer than seq_len={self.cfg.seq_len}")
        if self.cfg.episode_marker != (episode_start is not None):
            raise ValueError(
                "pass episode_start exactly when the model has episode_marker=True "
                f"(episode_marker={self.cfg.episode_marker}, episode_start given: {episode_start is not None})"
            )
        pos = torch.arange(l, device=states.device)
        x = (
            self.embed_states(states)
            + self.emb_a(prev_actions)
            + self.emb_r(prev_rewards)
            + self.emb_pos(pos)
        )
        if episode_start is not None:
            if episode_start.shape != states.shape:
                raise ValueError(
                    f"episode_start {tuple(episode_start.shape)} != states {tuple(states.shape)}"
                )
            x = x + self.emb_start(episode_start.long())
        x = self.emb_drop(x)
        a = self.ngram_matrices(states, prev_actions, prev_rewards) if self.cfg.ngram_layers else None
        for block in self.blocks:
            x = block(x, a)
        return self.head(self.norm(x))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def checkpoint(self) -> dict:
        return {"config": asdict(self.cfg), "state_dict": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> ADTransformer:
        cfg = ADConfig(**ckpt["config"])
        if cfg.episode_marker and "emb_start.weight" not in ckpt["state_dict"]:
            raise OldMarkerCheckpoint(
                "this checkpoint has episode_marker=True but no episode-start embedding: it was trained with the "
                "former marker, which overwrote a_{t-1}, r_{t-1} of every episode's first token with pads (hiding "
                "Key-to-Door door rewards); train it again"
            )
        model = cls(cfg)
        model.load_state_dict(ckpt["state_dict"])
        return model


class OldMarkerCheckpoint(ValueError):
    """A checkpoint from before the episode-start flag became its own input (see ``ADConfig.episode_marker``)."""
