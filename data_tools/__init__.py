"""Images and annotations -> WebDataset shards (benchmarks, EmoSet JSON, crawled URL lists), and the shard reader."""
