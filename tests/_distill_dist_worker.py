"""Run by tests/test_distill_distributed.py, alone or under torchrun: one distillation stage through the
library call every rank makes (`distill_stage`), optionally stopped after a few steps like a killed job."""

import argparse

import torch

from distill.run import Interrupted, distill_stage

ap = argparse.ArgumentParser()
ap.add_argument("--stage", type=int, required=True)
ap.add_argument("--teacher", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--init-from", required=True)
ap.add_argument("--strategy", default="auto")
ap.add_argument("--stop-after", type=int, default=None)
args = ap.parse_args()

torch.set_num_threads(1)
try:
    distill_stage(args.stage, teacher=args.teacher, data=args.data, out=args.out, init_from=args.init_from,
                  tokens=6 * 4 * 32, seq_len=32, batch_size=4, lr=3e-3, seed=1, device="cpu", progress=False,
                  ckpt_every_s=1e9, stop_after=args.stop_after, strategy=args.strategy)
except Interrupted:
    pass
