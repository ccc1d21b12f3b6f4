"""The stream settings of a run: its train and eval sides as :class:`~pipelines.data.stream.StreamConfig`."""

from ..data.shards import read_manifest, shard_paths
from ..data.stream import StreamConfig, train_loader
from .config import TrainConfig


def stream_settings(cfg: TrainConfig) -> dict:
    """What every stream of a run shares: caches, text fields, tokenizer, workers, seed, limits."""
    return dict(caches=cfg.caches, texts=cfg.text_lens(), expect=cfg.expect, tokenizer=cfg.tokenizer_path(), num_workers=cfg.num_workers,
                seed=cfg.seed, allow_missing=cfg.allow_missing, max_answer_len=cfg.max_answer_len,
                inline=read_manifest(cfg.shards).get("inline") or {})


def eval_stream_config(cfg: TrainConfig, shards: list) -> StreamConfig:
    """The config of an eval stream over ``shards`` (or, given its records, named by them)."""
    return StreamConfig(shards=shards, batch_size=cfg.eval_batch_size, **stream_settings(cfg))


def stream_configs(cfg: TrainConfig, num_processes: int = 1, eval_side: str = "eval") -> tuple:
    """``(train, eval)`` stream configs of a run; ``eval_side`` names the shard side to score."""
    train_sc = StreamConfig(shards=shard_paths(cfg.shards, "train"), batch_size=cfg.batch_size,
                            shuffle_buffer=cfg.shuffle_buffer, resample=num_processes > 1,
                            pad_multiple=cfg.pad_length(), **stream_settings(cfg))
    return train_sc, eval_stream_config(cfg, shard_paths(cfg.shards, eval_side))


def batches(sc: StreamConfig, epoch: int, skip: int, readers: dict):
    """Endless training batches as ``(epoch, index in epoch, batch)``; starts at (epoch, skip)."""
    while True:
        for i, batch in enumerate(train_loader(sc, epoch, readers)):
            if i >= skip:
                yield epoch, i, batch
        epoch, skip = epoch + 1, 0
