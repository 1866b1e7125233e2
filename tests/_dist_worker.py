"""Launched by tests/test_distributed.py under torchrun (or alone): a few data-parallel training steps of a tiny
Llamba with the primitives of distill.distributed; writes the consolidated weights from rank 0."""

import argparse
import sys

import torch

from llamba.config import LlambaConfig
from llamba.distill.distributed import DistContext, full_state_dict, load_sharded, save_sharded, wrap_student
from llamba.model import LlambaBlock, LlambaForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--strategy", default="auto")
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--start", type=int, default=0)
ap.add_argument("--save-dcp")
ap.add_argument("--load-dcp")
ap.add_argument("--out", required=True)
args = ap.parse_args()

torch.set_num_threads(1)
ctx = DistContext.from_env("cpu")
config = LlambaConfig(
    vocab_size=64,
    d_model=32,
    n_layer=2,
    intermediate_size=64,
    d_state=8,
    n_v_heads=4,
    n_qk_heads=4,
    chunk_size=8,
)
torch.manual_seed(0)
model = wrap_student(LlambaForCausalLM(config), ctx, args.strategy, block_cls=LlambaBlock)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
if args.load_dcp:
    extra = load_sharded(args.load_dcp, model, opt, {"step": 0})
    assert extra["step"] == args.start, extra
for step in range(args.start, args.start + args.steps):
    data = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(100 + step))  # global batch
    ids = ctx.shard(data)
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
if args.save_dcp:
    save_sharded(args.save_dcp, model, opt, ctx, {"step": args.start + args.steps})
state = full_state_dict(model)
if ctx.is_main:
    torch.save(state, args.out)
sys.exit(0)
