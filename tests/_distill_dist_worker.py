"""Run by tests/test_distill_distributed.py, alone or under torchrun: distillation stages through the library call
every rank makes (`distill_stage`), optionally stopped after a few steps like a killed job."""

import argparse

import torch

from llamba.distill.config import DistillConfig
from llamba.distill.run import distill_stage
from llamba.distill.train import Interrupted

ap = argparse.ArgumentParser()
ap.add_argument(
    "--stage", required=True, help="one stage or several, comma-separated (each from --init-from)"
)
ap.add_argument("--teacher", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--init-from", required=True)
ap.add_argument("--strategy", default="auto")
ap.add_argument("--teacher-strategy", default="replicate")
ap.add_argument("--stream", action="store_true")
ap.add_argument("--stop-after", type=int, default=None)
args = ap.parse_args()

torch.set_num_threads(1)
for stage in map(int, args.stage.split(",")):
    try:
        cfg = DistillConfig.of(
            teacher=args.teacher,
            data=args.data,
            out=args.out,
            init_from=args.init_from,
            tokens=6 * 4 * 32,
            seq_len=32,
            batch_size=4,
            lr=3e-3,
            seed=1,
            device="cpu",
            no_progress=True,
            ckpt_every=1e9,
            stop_after=args.stop_after,
            strategy=args.strategy,
            teacher_strategy=args.teacher_strategy,
            stream=args.stream,
            stream_shards=4,
        )
        distill_stage(stage, cfg)
    except Interrupted:
        pass
