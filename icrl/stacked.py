"""Many same-shape AD models trained at once: every parameter of K models stacked on a leading K axis, one set of
batched ops per step (a hyperparameter grid at the cost of a few wide models instead of many narrow ones).

Each model keeps everything that makes it its own run: its seed (initial weights drawn exactly as ``train()`` draws
them, its window sampler, its dropout generator), its histories (budgets differ), and its lr, weight decay, beta1,
beta2, label smoothing, grad-clip norm, warmup and dropout rates. What must be shared is the structure: the model
config apart from the dropout rates and the n-gram orders (``structure_key``), and train.steps / batch_size.
n-gram orders differ by draw without changing shapes much, so a stack holds the union of the orders as heads and
multiplies the heads a model lacks by 0: their weights get no gradient and never reach the output, and the model
copied back out has exactly its own heads.

With dropout 0 a stacked model follows ``train()`` to float rounding (tested). With dropout the masks come from the
model's own generator, so a run's result does not depend on which runs share its stack, but it is not the same
noise as ``train()`` draws from the global RNG.
Dimensions: K models, b batch, l sequence length, n = b * l tokens, d width, h heads, p head dim, A actions.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from llamba.envs import EnvSpec
from llamba.icrl.evaluate import EvalConfig
from llamba.icrl.histories import Histories
from llamba.icrl.model import ADConfig, ADTransformer
from llamba.icrl.ngram import match_keys, ngram_attention, permuted_attention
from llamba.icrl.train import TrainConfig, WindowSampler, lr_at

FREE_FIELDS = ("dropout", "attn_dropout", "emb_dropout", "ngram_orders")  # may differ inside a stack


def structure_key(cfg: ADConfig) -> str:
    """Model configs with equal keys can share a stack: all fields but ``FREE_FIELDS``."""
    return json.dumps({k: v for k, v in asdict(cfg).items() if k not in FREE_FIELDS}, sort_keys=True)


class StackRun(NamedTuple):
    """One run of a stack: its training histories and configs (``train.seed`` seeds init, windows and dropout)."""

    h: Histories
    model: ADConfig
    train: TrainConfig


def _head_slots(cfgs: list[ADConfig]) -> list[int]:
    """The stack's n-gram heads: every order as often as the model that repeats it most (sorted)."""
    most: Counter = Counter()
    for c in cfgs:
        most |= Counter(c.ngram_orders)
    return sorted(most.elements())


def _model_slots(cfg: ADConfig, slots: list[int]) -> list[int]:
    """Model head i (order o, its j-th head of order o) -> the stack slot holding the j-th head of order o."""
    seen: Counter = Counter()
    out = []
    for o in cfg.ngram_orders:
        out.append([i for i, s in enumerate(slots) if s == o][seen[o]])
        seen[o] += 1
    return out


def _stack_name(name: str, slot_of: list[int]) -> str:
    """ADTransformer parameter name -> stack name: w2.{i} of a model is w2.{slot} of the stack."""
    parts = name.split(".")
    if len(parts) > 3 and parts[2] == "w2":
        parts[3] = str(slot_of[int(parts[3])])
    return ".".join(parts)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x: (K, n, i), w: (K, o, i), b: (K, o) -> (K, n, o)."""
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


def _embed(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """w: (K, V, d), idx: (K, n) -> (K, n, d): model k looks up its own table."""
    k, v, d = w.shape
    offset = torch.arange(k, device=idx.device).unsqueeze(1) * v
    return F.embedding(idx + offset, w.reshape(k * v, d))


def _norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LayerNorm with per-model affine: x: (K, n, d), w, b: (K, d)."""
    return torch.addcmul(b.unsqueeze(1), F.layer_norm(x, x.shape[-1:]), w.unsqueeze(1))


class StackedAD:
    """K ADTransformers of one structure as stacked tensors ``params[name]: (K, *shape)``; ``forward`` runs all K
    on K batches of windows. Built from the models themselves (``models``: their weights, configs and order)."""

    def __init__(self, models: list[ADTransformer], seeds: list[int], device: str | torch.device = "cpu"):
        if not models:
            raise ValueError("a stack needs at least one model")
        cfgs = [m.cfg for m in models]
        keys = {structure_key(c) for c in cfgs}
        if len(keys) > 1:
            raise ValueError(
                "stacked models must share their structure (all model fields but dropout rates and ngram_orders); "
                "group runs by icrl.stacked.structure_key"
            )
        self.cfg, self.k, self.device = cfgs[0], len(models), torch.device(device)
        self.slots = _head_slots(cfgs) if self.cfg.ngram_layers else []
        self.slot_of = [_model_slots(c, self.slots) if self.cfg.ngram_layers else [] for c in cfgs]
        # (K, slots) 1 where the model has that head, 0 where it is padding
        self.head_mask = torch.zeros(self.k, len(self.slots), device=self.device)
        for i, slot_of in enumerate(self.slot_of):
            self.head_mask[i, slot_of] = 1.0
        self.params: dict[str, torch.Tensor] = {}
        # AdamW decays the parameters that are matrices in the model (dim >= 2), as train() does
        self.decay: dict[str, bool] = {}
        for i, m in enumerate(models):
            for name, p in m.named_parameters():
                name = _stack_name(name, self.slot_of[i])
                if name not in self.params:
                    self.params[name] = torch.zeros(self.k, *p.shape, device=self.device)
                    self.decay[name] = p.dim() >= 2
                self.params[name][i] = p.detach().to(self.device)
        for p in self.params.values():
            p.requires_grad_(True)
        rates = [[getattr(c, f) for c in cfgs] for f in ("emb_dropout", "attn_dropout", "dropout")]
        self.rates = {f: r for f, r in zip(("emb", "attn", "resid"), rates, strict=True)}
        self.gens = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        self.rngs = [np.random.default_rng(s) for s in seeds]  # CPU dropout masks
        self.training = True

    def copy_to(self, models: list[ADTransformer]) -> None:
        """Write the stacked weights back into the K models (each gets exactly its own heads)."""
        with torch.no_grad():
            for i, m in enumerate(models):
                for name, p in m.named_parameters():
                    p.copy_(self.params[_stack_name(name, self.slot_of[i])][i].to(p.device))

    def _dropout(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """x: (K, ...): model k drops with its own rate and random stream; a no-op in eval mode or at rate 0.
        On the CPU the masks come from NumPy (PCG64 draws ~4x faster than torch's bernoulli_ there, and the
        masks are most of a step's cost); elsewhere from the model's torch generator on the device."""
        rates = self.rates[which]
        if not self.training or not any(rates):
            return x
        if self.device.type == "cpu":
            # (K, ...) filled in place, then shared with torch without a copy
            u = np.empty(x.shape, np.float32)
            for i, r in enumerate(rates):
                if r == 0:
                    u[i] = 1.0
                    continue
                self.rngs[i].random(dtype=np.float32, out=u[i])
                np.greater_equal(u[i], r, out=u[i], casting="unsafe")  # 1.0 where kept (u >= r), else 0.0
                np.multiply(u[i], 1 / (1 - r), out=u[i])
            return x * torch.from_numpy(u)
        mask = torch.empty_like(x)
        for i, r in enumerate(rates):
            if r == 0:
                mask[i].fill_(1.0)
            else:
                mask[i].bernoulli_(1 - r, generator=self.gens[i]).div_(1 - r)
        return x * mask

    def _attention(self, x: torch.Tensor, pre: str, b: int) -> torch.Tensor:
        """x: (K, n, d) normed -> (K, n, d) causal self-attention output (before the output projection)."""
        k, n, d = x.shape
        h = self.cfg.n_heads
        l, p = n // b, d // h
        qkv = _linear(x, self.params[pre + "qkv.weight"], self.params[pre + "qkv.bias"])
        q, kk, v = qkv.view(k * b, l, 3, h, p).permute(2, 0, 3, 1, 4)  # (K b, h, l, p)
        if self.training and any(self.rates["attn"]):
            # additive causal mask: 0 on and below the diagonal, -inf above
            causal = torch.full((l, l), float("-inf"), device=x.device).triu(1)
            q, kk, v = (t.reshape(k * b * h, l, p) for t in (q, kk, v))
            att = torch.baddbmm(causal, q, kk.transpose(1, 2), alpha=p**-0.5).softmax(-1)  # (K b h, l, l)
            att = self._dropout(att.view(k, b * h, l, l), "attn").view(k * b * h, l, l)
            y = torch.bmm(att, v).view(k * b, h, l, p)
        else:
            y = F.scaled_dot_product_attention(q, kk, v, is_causal=True)
        return y.transpose(1, 2).reshape(k, n, d)

    def _mlp(self, x: torch.Tensor, pre: str) -> torch.Tensor:  # x: (K, n, d)
        P = self.params
        y = F.gelu(_linear(x, P[pre + "mlp.fc.weight"], P[pre + "mlp.fc.bias"]))
        return self._dropout(_linear(y, P[pre + "mlp.proj.weight"], P[pre + "mlp.proj.bias"]), "resid")

    def _ngram_matrices(self, states, prev_actions, prev_rewards) -> list[torch.Tensor]:
        """(K b, l) ints -> one (K b, l, l) successor matrix per head slot."""
        c = self.cfg
        keys = match_keys(states, prev_actions, prev_rewards, c.ngram_key, c.num_states, c.num_rewards)
        mats = {o: ngram_attention(keys, o) for o in sorted(set(self.slots))}
        if c.ngram_permuted:  # each model permutes with its own generator
            b = keys.shape[0] // self.k
            mats = {
                o: torch.cat([permuted_attention(m[i * b : (i + 1) * b], g) for i, g in enumerate(self.gens)])
                for o, m in mats.items()
            }
        return [mats[o] for o in self.slots]

    def forward(self, states, prev_actions, prev_rewards, episode_start=None) -> torch.Tensor:
        """states, prev_actions, prev_rewards: (K, b, l) ints; episode_start: (K, b, l) bool with
        ``episode_marker`` -> action logits (K, b, l, A)."""
        c, P = self.cfg, self.params
        k, b, l = states.shape
        if k != self.k or l > c.seq_len:
            raise ValueError(
                f"inputs {tuple(states.shape)} do not fit {self.k} models of seq_len {c.seq_len}"
            )
        if c.episode_marker != (episode_start is not None):
            raise ValueError("pass episode_start exactly when the models have episode_marker=True")
        flat = lambda t: t.reshape(k, b * l)
        if c.state_emb == "rowcol":
            size = math.isqrt(c.num_states)
            x = _embed(P["emb_row.weight"], flat(states) // size) + _embed(
                P["emb_col.weight"], flat(states) % size
            )
        else:
            x = _embed(P["emb_s.weight"], flat(states))
        x = x + _embed(P["emb_a.weight"], flat(prev_actions)) + _embed(P["emb_r.weight"], flat(prev_rewards))
        x = (x.view(k, b, l, -1) + P["emb_pos.weight"][:, None, :l]).view(k, b * l, -1)
        if episode_start is not None:
            x = x + _embed(P["emb_start.weight"], flat(episode_start.long()))
        x = self._dropout(x, "emb")
        mats = []
        if c.ngram_layers:
            mats = self._ngram_matrices(
                states.reshape(k * b, l), prev_actions.reshape(k * b, l), prev_rewards.reshape(k * b, l)
            )
        for i in range(c.n_layers):
            pre = f"blocks.{i}."
            if i in c.ngram_layers:  # NGL(h) = h + MLP[W1 h' + sum_n W2^(n) A^(n) h'], as NGramBlock
                hn = _norm(x, P[pre + "norm.weight"], P[pre + "norm.bias"])
                y = _linear(hn, P[pre + "w1.weight"], P[pre + "w1.bias"])
                hb = hn.view(k * b, l, -1)
                for s, a in enumerate(mats):
                    z = _linear(
                        torch.bmm(a, hb).view(k, b * l, -1), P[f"{pre}w2.{s}.weight"], P[f"{pre}w2.{s}.bias"]
                    )
                    y = y + z * self.head_mask[:, s, None, None]
                x = x + self._mlp(y, pre)
            else:
                y = self._attention(_norm(x, P[pre + "norm1.weight"], P[pre + "norm1.bias"]), pre, b)
                x = x + self._dropout(_linear(y, P[pre + "out.weight"], P[pre + "out.bias"]), "resid")
                x = x + self._mlp(_norm(x, P[pre + "norm2.weight"], P[pre + "norm2.bias"]), pre)
        x = _norm(x, P["norm.weight"], P["norm.bias"])
        return _linear(x, P["head.weight"], P["head.bias"]).view(k, b, l, -1)

    __call__ = forward


class StackedAdamW:
    """AdamW over stacked parameters with one lr / weight decay / beta1 / beta2 / clip norm per model, and the
    per-model grad-norm clipping of ``clip_grad_norm_``; the same update as torch.optim.AdamW per model."""

    def __init__(self, model: StackedAD, cfgs: list[TrainConfig], eps: float = 1e-8):
        dev = model.device
        vec = lambda f: torch.tensor([getattr(c, f) for c in cfgs], dtype=torch.float64)
        self.model, self.cfgs, self.eps, self.t = model, cfgs, eps, 0
        self.wd, self.beta1, self.beta2, self.clip = (
            vec(f) for f in ("weight_decay", "beta1", "beta2", "grad_clip")
        )
        self.m = {n: torch.zeros_like(p) for n, p in model.params.items()}
        self.v = {n: torch.zeros_like(p) for n, p in model.params.items()}
        self._f32 = lambda t: t.to(device=dev, dtype=torch.float32)

    @torch.no_grad()
    def step(self, step: int) -> None:
        """One update at schedule step ``step`` (each model's ``lr_at``); clears the gradients."""
        self.t += 1
        lr = torch.tensor([lr_at(step, c) for c in self.cfgs], dtype=torch.float64)
        params = self.model.params
        live = {n: p for n, p in params.items() if p.grad is not None}  # as AdamW: no gradient, no update
        sq = torch.stack([p.grad.flatten(1).square().sum(1) for p in live.values()]).sum(0)  # (K,)
        coef = (self._f32(self.clip) / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        step_size = self._f32(lr / (1 - self.beta1**self.t))
        bc2_sqrt = self._f32((1 - self.beta2**self.t).sqrt())
        shrink = self._f32(1 - lr * self.wd)
        one_m_b1, b2, one_m_b2 = self._f32(1 - self.beta1), self._f32(self.beta2), self._f32(1 - self.beta2)
        for name, p in live.items():
            view = (-1,) + (1,) * (p.dim() - 1)
            g = p.grad.mul_(coef.view(view))
            if self.model.decay[name]:
                p.mul_(shrink.view(view))
            m, v = self.m[name], self.v[name]
            m.lerp_(g, one_m_b1.view(view))
            v.mul_(b2.view(view)).addcmul_(g, g * one_m_b2.view(view))
            denom = (v.sqrt() / bc2_sqrt.view(view)).add_(self.eps)
            p.addcdiv_(m * step_size.view(view), denom, value=-1.0)
            p.grad = None


def stacked_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: torch.Tensor) -> torch.Tensor:
    """logits: (K, b, l, A), targets: (K, b, l), smoothing: (K,) -> (K,) mean cross-entropy per model with its own
    label smoothing (as F.cross_entropy: (1 - e) nll + e * mean over classes of -log p)."""
    logp = F.log_softmax(logits.flatten(1, 2).float(), -1)  # (K, n, A)
    nll = -logp.gather(-1, targets.flatten(1).unsqueeze(-1)).squeeze(-1).mean(1)
    smooth = -logp.mean(-1).mean(1)
    return (1 - smoothing) * nll + smoothing * smooth


def _check_runs(runs: list[StackRun]) -> None:
    if not runs:
        raise ValueError("train_stacked needs at least one run")
    first = runs[0].train
    for r in runs:
        if (r.train.steps, r.train.batch_size) != (first.steps, first.batch_size):
            raise ValueError(
                "stacked runs must share train.steps and train.batch_size; stack only runs of one grid"
            )


def train_stacked(
    runs: list[StackRun], device: str | torch.device = "cpu", progress=None
) -> list[tuple[ADTransformer, list[float]]]:
    """Train K models of one structure at once -> per run (model on the CPU in eval mode, loss per step), as
    ``train(run.h, run.model, run.train)`` returns them. ``progress(K)`` is called every step."""
    _check_runs(runs)
    first = runs[0].train
    if first.threads > 0:
        torch.set_num_threads(first.threads)
    models = []
    for r in runs:  # init exactly as train() does: the run's seed, then its model
        torch.manual_seed(r.train.seed)
        models.append(ADTransformer(r.model))
    samplers = [
        WindowSampler(
            r.h,
            r.model.seq_len,
            r.model.num_actions,
            r.model.num_rewards,
            r.train.seed,
            r.model.episode_marker,
        )
        for r in runs
    ]
    stack = StackedAD(models, [r.train.seed for r in runs], device)
    opt = StackedAdamW(stack, [r.train for r in runs])
    smoothing = torch.tensor([r.train.label_smoothing for r in runs], device=stack.device)
    losses = torch.zeros(first.steps, len(runs), device=stack.device)
    stack.training = True
    for step in range(first.steps):
        windows = [s.sample(first.batch_size) for s in samplers]
        cols = [
            torch.stack(f).to(stack.device) if f[0] is not None else None for f in zip(*windows, strict=True)
        ]
        states, prev_a, prev_r, targets, start = cols
        logits = stack(states, prev_a, prev_r, start)  # (K, b, l, A)
        loss = stacked_loss(logits, targets, smoothing)  # (K,)
        loss.sum().backward()  # the models share no weights: each gets the gradient of its own loss
        opt.step(step)
        losses[step] = loss.detach()
        if progress is not None:
            progress(len(runs))
    stack.copy_to(models)
    curves = losses.T.cpu().tolist()
    return [(m.eval(), c) for m, c in zip(models, curves, strict=True)]


@torch.no_grad()
def stacked_in_context_returns(
    stack: StackedAD, spec: EnvSpec, tasks: np.ndarray, cfgs: list[EvalConfig]
) -> np.ndarray:
    """tasks: (b,) or (b, 2), the same for all K models -> returns (K, b, episodes). Model k plays as
    ``in_context_returns(model_k, spec, tasks, cfgs[k])`` does (its own env rng and sampling generator, the same
    FIFO context of the last seq_len transitions), with one stacked forward pass per context length and step."""
    e0, c, k = cfgs[0], stack.cfg, stack.k
    if len(cfgs) != k or any((e.episodes, e.greedy) != (e0.episodes, e0.greedy) for e in cfgs):
        raise ValueError(
            "stacked evaluation needs one EvalConfig per model, all with the same episodes and greedy"
        )
    training, stack.training = stack.training, False
    rngs = [np.random.default_rng(e.seed) for e in cfgs]
    gens = [torch.Generator().manual_seed(e.seed) for e in cfgs]
    envs = [spec.batched(tasks) for _ in range(k)]
    b, cap = envs[0].b, c.seq_len
    ring = np.zeros((k, b, cap, 4), np.int64)  # last seq_len tokens (s_t, a_{t-1}, r_{t-1}, episode start)
    count = np.zeros((k, b), np.int64)  # tokens appended so far per model and task
    prev_a, prev_r = np.full((k, b), c.num_actions), np.full((k, b), c.num_rewards)
    returns = np.zeros((k, b, e0.episodes))
    for e in range(e0.episodes):
        obs = np.stack([env.reset(rng) for env, rng in zip(envs, rngs, strict=True)])  # (K, b)
        first = np.ones((k, b), bool)
        while True:
            active = ~np.stack([env.done for env in envs])  # (K, b)
            if not active.any():
                break
            mi, ti = np.nonzero(active)
            tok = np.stack([obs[mi, ti], prev_a[mi, ti], prev_r[mi, ti], first[mi, ti]], -1)
            ring[mi, ti, count[mi, ti] % cap] = tok
            count[mi, ti] += 1
            first[active] = False
            length = np.minimum(count, cap)
            actions = np.zeros((k, b), np.int64)
            for n in np.unique(length[active]):  # as in_context_returns: one batch per context length
                sel = active & (length == n)  # (K, b)
                g = sel.sum(1)
                seq = np.zeros((k, g.max(), n, 4), np.int64)  # models with fewer rows are padded
                for i in np.flatnonzero(g):
                    rows = np.flatnonzero(sel[i])
                    seq[i, : len(rows)] = ring[
                        i, rows[:, None], (count[i, rows, None] - n + np.arange(n)) % cap
                    ]
                x = torch.from_numpy(seq).to(stack.device)
                flag = (x[..., 3] == 1,) if c.episode_marker else ()
                logits = stack(x[..., 0], x[..., 1], x[..., 2], *flag)[:, :, -1].float().cpu()  # (K, g, A)
                for i in np.flatnonzero(g):
                    li = logits[i, : g[i]]
                    if e0.greedy:
                        act = li.argmax(-1)
                    else:
                        act = torch.multinomial(torch.softmax(li, -1), 1, generator=gens[i]).squeeze(-1)
                    actions[i, sel[i]] = act.numpy()
            for i, env in enumerate(envs):
                obs[i], rew, _, _ = env.step(actions[i])
                prev_a[i] = np.where(active[i], actions[i], prev_a[i])
                prev_r[i] = np.where(active[i], rew.astype(np.int64), prev_r[i])
                returns[i, :, e] += rew
    stack.training = training
    return returns
