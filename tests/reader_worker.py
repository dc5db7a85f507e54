"""Run under torchrun by test_reader: each rank reads its part of the shards with 2 workers; rank 0 writes keys."""
import json
import sys

from data_tools.reader import SharedEpoch, make_loader
from runtime import distributed


def key_only(sample):
    return {"key": sample["__key__"]}


env = distributed.init_distributed(distributed.resolve_env())
pattern, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
resampled = mode == "resampled"
epoch = SharedEpoch()
result = {}
for e in (0, 1):
    epoch.set(e)
    loader = make_loader(pattern, batch_size=4, transform=key_only, num_workers=2, seed=7, epoch=epoch,
                         rank=env.rank, world_size=env.world_size, resampled=resampled,
                         batches_per_epoch=5 if resampled else None, drop_last=False)
    keys = [k for batch in loader for k in batch["key"]]
    result[e] = distributed.all_gather_object(keys)
if env.is_main:
    json.dump({"epochs": result, "num_batches": loader.num_batches}, open(out, "w"))
distributed.shutdown()
