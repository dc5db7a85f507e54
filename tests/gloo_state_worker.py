"""Run under torchrun by test_clean_exit: training steps and collectives between two probes of the interpreter's
next thread-state id; each rank writes how many Python thread states were created in between. argv: OUT, "runtime"
(init_distributed, DDP), "deepspeed" (init_distributed, ZeRO-2, which makes a gloo group of its own) or "plain"
(a bare init_process_group, DDP)."""
import ctypes
import json
import os
import sys
import threading

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from runtime import distributed
from runtime.entry import init_distributed_for
from runtime.strategy import make_strategy


def next_thread_state_id() -> int:
    """The id CPython gives the next thread state it creates (ids are handed out in order): a probe thread's own."""
    get_id, current = ctypes.pythonapi.PyThreadState_GetID, ctypes.pythonapi.PyThreadState_Get
    get_id.restype, get_id.argtypes, current.restype = ctypes.c_uint64, [ctypes.c_void_p], ctypes.c_void_p
    out = []
    probe = threading.Thread(target=lambda: out.append(get_id(current())))
    probe.start()
    probe.join()
    return out[0]


def created_thread_states(mode: str) -> int:
    """Thread states created by 20 steps and collectives; the model and strategy go with this frame, as a trainer's
    go with its job, so shutdown() leaves no group behind."""
    net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    if mode == "plain":
        model, backward = DistributedDataParallel(net), lambda loss: loss.backward()
    else:
        strategy = make_strategy("ddp" if mode == "runtime" else "deepspeed", net,
                                 torch.optim.AdamW(net.parameters()), torch.device("cpu"),
                                 deepspeed_config="configs/deepspeed/zero2.json", batch_per_rank=8)
        model = strategy.model

        def backward(loss):
            strategy.backward(loss)
            strategy.step()
    first = next_thread_state_id()
    for step in range(20):
        backward(model(torch.randn(8, 16)).square().mean())
        distributed.all_reduce_sum(torch.ones(2)).tolist()
        distributed.all_gather_object(step)
    return next_thread_state_id() - first - 1  # the second probe's own state is not counted


out_dir, mode = sys.argv[1], sys.argv[2]
if mode == "plain":
    import torch._dynamo  # noqa: F401  (as init_distributed does)
    dist.init_process_group("gloo")
    env = distributed.resolve_env()
else:
    env = init_distributed_for("ddp" if mode == "runtime" else "deepspeed")
created = created_thread_states(mode)
distributed.shutdown(wait_for_peers=True)
with open(os.path.join(out_dir, f"{mode}_rank{env.rank}.json"), "w") as f:
    json.dump({"created": created}, f)
