"""Run under torchrun by test_clean_exit; each rank writes the names of the threads it still has after shutdown.
argv: OUT, "late_import" (a collective, torchvision imported late as the loader's decoder does, another collective)
or "deepspeed" (ZeRO-2 steps inside a function that returns, as a trainer's job does, with DeepSpeed's gradient hooks
still holding the engine and its groups)."""
import json
import os
import sys

import torch

from runtime import distributed
from runtime.entry import init_distributed_for
from runtime.strategy import make_strategy


def late_import(env: distributed.DistEnv) -> None:
    distributed.all_gather_object(env.rank)
    import torchvision  # noqa: F401  (imports torch._dynamo)
    distributed.all_gather_object({"rank": env.rank, "payload": list(range(100))})


def deepspeed_steps() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    strategy = make_strategy("deepspeed", net, torch.optim.AdamW(net.parameters()), torch.device("cpu"),
                             deepspeed_config="configs/deepspeed/zero2.json", batch_per_rank=8)
    for _ in range(3):
        strategy.backward(strategy.model(torch.randn(8, 16)).square().mean())
        strategy.step()


out_dir, mode = sys.argv[1], sys.argv[2]
if mode == "deepspeed":
    env = init_distributed_for("deepspeed")
    deepspeed_steps()
else:
    env = distributed.init_distributed(distributed.resolve_env())
    late_import(env)
distributed.shutdown(wait_for_peers=True)
threads = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
with open(os.path.join(out_dir, f"{mode}_threads_rank{env.rank}.json"), "w") as f:
    json.dump(threads, f)
