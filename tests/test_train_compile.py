"""The compiled training step (``fuse-train --compile``): static shapes from bucket padding, the same
losses and gradients as the eager step, and a real run with it. Everything runs for real on the CPU
(torch.compile's inductor, with the machine's C++ compiler)."""

import numpy as np

from pipelines.data.batch import Collate, bucket_length
from pipelines.train.config import TrainConfig
from pipelines.train.loop import train


def test_bucket_length_rounds_up_to_the_multiple_never_past_the_limit():
    assert [bucket_length(n, 8, 128) for n in (1, 8, 9, 17, 127, 128)] == [8, 8, 16, 24, 128, 128]
    assert bucket_length(13, 8, 12) == 13  # already past a (smaller) limit: kept
    assert bucket_length(13, 8, 14) == 14
    assert bucket_length(13, 1, 128) == 13


def test_collate_pads_text_and_answer_to_the_multiple():
    collate = Collate({"question": 40}, tokenizer="byt5", max_answer_len=6, pad_multiple=8)
    samples = [{"id": i, "texts": {"question": q}, "vectors": {}, "target": a, "references": [a], "groups": {}}
               for i, (q, a) in enumerate([("what colour?", "red"), ("how many circles are there?", "2")])]
    b = collate(samples)
    ids, mask = b["tokens"]["question"]
    plain = Collate({"question": 40}, tokenizer="byt5", max_answer_len=6)(samples)
    pids, pmask = plain["tokens"]["question"]
    assert ids.shape == (2, 32) and pids.shape == (2, 28)  # 27 bytes + EOS -> 32
    assert (ids[:, :28] == pids).all() and (ids[:, 28:] == 0).all() and (mask[:, 28:] == 0).all()
    assert mask.sum() == pmask.sum()
    assert b["labels"].shape == (2, 6) and plain["labels"].shape == (2, 4)  # the cap: max_answer_len 6
    assert (b["labels"][:, 4:] == -100).all() and (b["labels"][:, :4] == plain["labels"]).all()


def test_fuse_train_compile_learns_as_the_eager_run(vqa_data, tmp_path):
    """Every step's loss of a compiled run equals the eager run's (same weights, same batches): the
    compiled forward and its gradients are the eager ones. One padded shape (--pad-multiple 16), so
    one compilation (the costly part: tens of seconds on 2 cores)."""
    data = vqa_data(60, 3)
    runs = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        cfg = TrainConfig(shards=str(data / "qa"), caches={"image": str(data / "cache")}, out=str(tmp_path / name),
                          t5="tiny", tokenizer="words", fuse="0:question 2:image", steps=6, batch_size=16,
                          eval_every=6, eval_limit=16, lr=3e-3, warmup=0.0, num_workers=0, progress=False,
                          log_every=1, compile=compiled, pad_multiple=16, threads=1)
        runs[name] = train(cfg)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = {}
    for name in runs:
        ea = EventAccumulator(str(tmp_path / name / "tb"))
        ea.Reload()
        curves[name] = np.array([e.value for e in ea.Scalars("train/loss")])
    # the same batches (same padding), the same weights: the same curve within float tolerance
    np.testing.assert_allclose(curves["compiled"], curves["eager"], rtol=1e-3)
    assert len(curves["eager"]) == 6 and curves["eager"][-1] < curves["eager"][0]
    assert runs["compiled"]["config"]["compile"]
