"""Run under torchrun by test_clean_exit: a collective, then torchvision imported late (as the loader's decoder
does), another collective and shutdown; each rank writes the names of the threads it still has."""
import json
import os
import sys

from runtime import distributed

env = distributed.init_distributed(distributed.resolve_env())
distributed.all_gather_object(env.rank)
import torchvision  # noqa: E402,F401  (imports torch._dynamo)
distributed.all_gather_object({"rank": env.rank, "payload": list(range(100))})
distributed.shutdown()
threads = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
with open(os.path.join(sys.argv[1], f"threads_rank{env.rank}.json"), "w") as f:
    json.dump(threads, f)
