"""Run under torchrun by test_metric_logger: each rank logs known values, rank 0 writes TensorBoard events."""
import sys

import torch

from runtime import distributed
from runtime.metric_logger import MetricLogger

env = distributed.init_distributed(distributed.resolve_env())
logger = MetricLogger(sys.argv[1], every=3, console=False, summed=("dropped",), counted=("skipped",))
for step in range(1, 7):
    # rank r logs loss = 10 * r + step, acc = step; 4 samples per step per rank; drops r + 1 samples per step (a
    # count summed over steps and ranks); a skipped update at steps 2 and 3 (the same on every rank)
    logger.update(step, samples=4, data_time=0.0, loss=torch.tensor(10.0 * env.rank + step), acc=float(step),
                  dropped=float(env.rank + 1), skipped=torch.tensor(float(step in (2, 3))))
logger.write_scalars(6, {"train/lr": 0.5})
logger.image("recon", torch.rand(3, 8, 8), 6)
logger.text("config", "hello", 0)
logger.close()
distributed.shutdown()
