"""Teacher hidden states kept in memory, so stage 2 can run several epochs over the same rows without re-running
the teacher.

Stage 2 is teacher-forced and layer-local: each student block only needs the teacher's residual stream entering and
leaving its layer. Those streams depend only on the token ids, so they are computed once per row and stored (bf16
by default: half the memory, a relative rounding error of ~2^-9, far below the per-layer errors stages 1-2 reach).

    pool = epoch_pool(data, tokens, epochs, seed)   # TokenData whose train split is tokens / epochs tokens
    cache = TeacherStateCache(teacher)               # cache(ids) returns what teacher_residuals(teacher, ids) does
"""

from __future__ import annotations

import torch
from torch import nn

from llamba.distill.data import TokenData
from llamba.distill.teacher import teacher_residuals


def epoch_pool(data: TokenData, tokens: int, epochs: int, seed: int = 0) -> TokenData:
    """The rows one stage cycles over when it sees `tokens` tokens in `epochs` passes: a seeded random subset of
    ceil(tokens / epochs / l) training rows (all of them when the split is smaller). data.train: (n, l)."""
    n, seq_len = data.train.shape
    rows = max(1, -(-tokens // (max(1, epochs) * seq_len)))
    if rows >= n:
        return data
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + 17))[:rows]
    return TokenData(train=data.train[pick.sort().values], heldout=data.heldout)


class TeacherStateCache:
    """Memoized `teacher_residuals` (with_attn_out as given; logits are not kept): rows are keyed by their token
    ids, so a row seen before costs a lookup, and a batch with new rows runs the teacher on those rows only."""

    def __init__(self, teacher: nn.Module, with_attn_out: bool = False, dtype: torch.dtype = torch.bfloat16):
        self.teacher, self.with_attn_out, self.dtype = teacher, with_attn_out, dtype
        self.rows: dict[bytes, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.hits = self.misses = 0

    @staticmethod
    def _key(row: torch.Tensor) -> bytes:
        return row.detach().cpu().numpy().tobytes()

    def __call__(self, ids: torch.Tensor) -> dict:
        """ids: (b, l) -> {'resid': n_layer + 1 tensors (b, l, d), 'attn_out': n_layer tensors (b, l, d) or None},
        in the dtype the teacher returns."""
        keys = [self._key(r) for r in ids]
        new = [i for i, k in enumerate(keys) if k not in self.rows]
        self.hits += len(keys) - len(new)
        self.misses += len(new)
        out_dtype = None
        if new:
            out = teacher_residuals(self.teacher, ids[new], with_attn_out=self.with_attn_out)
            out_dtype = out["resid"][0].dtype
            resid = torch.stack(out["resid"], dim=1).to(self.dtype)  # (b', n_layer + 1, l, d)
            attn = torch.stack(out["attn_out"], dim=1).to(self.dtype) if self.with_attn_out else None
            for j, i in enumerate(new):
                self.rows[keys[i]] = (resid[j].clone(), None if attn is None else attn[j].clone())
        out_dtype = out_dtype or next(self.teacher.parameters()).dtype
        resid = torch.stack([self.rows[k][0] for k in keys]).to(
            ids.device, out_dtype
        )  # (b, n_layer + 1, l, d)
        attn = (
            torch.stack([self.rows[k][1] for k in keys]).to(ids.device, out_dtype)
            if self.with_attn_out
            else None
        )
        return {
            "resid": list(resid.unbind(1)),
            "attn_out": list(attn.unbind(1)) if attn is not None else None,
        }

    def nbytes(self) -> int:
        return sum(
            r.numel() * r.element_size() + (0 if a is None else a.numel() * a.element_size())
            for r, a in self.rows.values()
        )
