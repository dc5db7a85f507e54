"""The error raised for shards that cannot feed a run, and the shard-count check that both trainers share."""


class ShardError(ValueError):
    """Shards that are missing, empty, or too few for the readers that would share them."""


def check_enough_shards(n_shards: int, workers: int, world_size: int, what: str = "data.train") -> None:
    """Plain (not resampled) reading deals whole shards to loader workers x ranks: with fewer shards some reader
    gets none and the job hangs. An error naming the keys a user sets, before anything is built."""
    workers = max(1, workers)
    if n_shards < workers * world_size:
        raise ShardError(f"{what}: {n_shards} shard(s) cannot feed {workers} loader worker(s) x {world_size} rank(s) "
                         f"when data.resampled=false (each reader needs a shard of its own): set data.resampled=true, "
                         f"lower data.num_workers, or write more, smaller shards (data_tools --shard-size)")
