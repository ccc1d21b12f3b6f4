"""Run under ``accelerate launch`` by tests/test_nodes.py: iterate one epoch of the training stream
(not resampled) on this rank and write the example ids it got to OUT/rank-R.json."""

import json
import sys
from pathlib import Path

from accelerate import Accelerator

from pipelines.data.shards import shard_paths
from pipelines.data.stream import StreamConfig, train_loader


def main(shards: str, cache: str, out: str) -> None:
    accelerator = Accelerator(cpu=True)  # joins the process group: the stream splits shards by its rank
    config = StreamConfig(shards=shard_paths(shards, "train"), caches={"image": cache}, batch_size=8, num_workers=2)
    ids = [i for batch in train_loader(config) for i in batch["id"]]
    record = {"rank": accelerator.process_index, "world": accelerator.num_processes, "ids": ids}
    Path(out, f"rank-{accelerator.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:4])
