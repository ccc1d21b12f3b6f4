"""The training and eval streams over real shards and real LMDB caches (small random values)."""

import io
import os
import pickle
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
import transformers

from pipelines.data.shards import write_shards
from pipelines.data.stream import (
    StreamConfig,
    check_stream,
    eval_loader,
    read_records,
    train_loader,
)
from pipelines.data.tokens import ByteTokenizer, load_tokenizer
from pipelines.errors import MissingEmbeddingsError
from pipelines.metrics.vqa import target_answer
from store import CacheWriter, MetadataMismatch, MissingIdError

SHAPE = (16, 32)
ANSWERS = ["red", "green", "blue", "two", "yes"]


def make_records(images, per_image=3):
    """Example dicts (:mod:`pipelines.data.example`): example ``i * 100 + k`` is about image ``i`` and
    audio clip ``a{i % 7}``, each vector field with its own id."""
    out = []
    for i in range(images):
        for k in range(per_image):
            answers = [ANSWERS[(i + k) % 5]] * 8 + ["blue", "red"]
            out.append({"id": i * 100 + k, "texts": {"question": f"What is {k} in picture {i}?" + " really" * (i % 3)},
                        "vectors": {"image": str(i), "audio": f"a{i % 7}"}, "target": target_answer(answers),
                        "references": answers, "groups": {"answer_type": "other"}, "split": "train"})
    return out


def make_cache(path, ids, shape=SHAPE, dtype="float16", skip=()):
    """Every value is filled with a number derived from its id, so joins can be checked."""
    with CacheWriter(path, shape=shape, dtype=dtype, producer={"model": "random"}) as w:
        for i in ids:
            if i not in skip:
                w.put(i, np.full(shape, value_of(i), dtype=np.float32))


def value_of(image_id):
    return float(int(image_id.lstrip("a")) + (200 if image_id.startswith("a") else 0))  # exact in bf16


@pytest.fixture
def data(tmp_path):
    records = make_records(40)
    shards = write_shards(records, tmp_path / "qa" / "train-%06d.tar", shard_size=1000, min_shards=8)
    make_cache(tmp_path / "cache", sorted({r["vectors"]["image"] for r in records}))
    return tmp_path, records, shards


def config(tmp_path, shards, **kw):
    kw = {"batch_size": 8, "num_workers": 0, "shuffle_buffer": 50, **kw}
    return StreamConfig(shards=shards, caches={"image": str(tmp_path / "cache")}, **kw)


def collect(loader):
    seen = []
    for b in loader:
        assert torch.equal(b["vectors"]["image"][:, 0, 0].float(),
                           torch.tensor([value_of(i) for i in b["ids"]["image"]]))  # joined by id
        assert b["ids"]["image"] == [str(i // 100) for i in b["id"]]  # each example's own image id
        seen += b["id"]
    return seen


def test_two_workers_yield_every_record_once_per_epoch(data):
    tmp_path, records, shards = data
    cfg = config(tmp_path, shards, num_workers=2)
    everything = sorted(r["id"] for r in records)
    epoch0 = collect(train_loader(cfg, epoch=0))
    epoch1 = collect(train_loader(cfg, epoch=1))
    assert sorted(epoch0) == everything and sorted(epoch1) == everything  # each exactly once
    assert epoch0 != epoch1 and epoch0 != everything  # shuffled, differently per epoch
    assert collect(train_loader(cfg, epoch=0)) == epoch0  # and reproducibly


def test_two_ranks_split_the_shards_without_overlap(data, monkeypatch):
    tmp_path, records, shards = data
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append(collect(train_loader(config(tmp_path, shards, num_workers=2))))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(r["id"] for r in records)


def test_resampled_stream_is_endless(data):
    tmp_path, records, shards = data
    loader = train_loader(config(tmp_path, shards, resample=True))
    ids = []
    for b in loader:
        ids += b["id"]
        if len(ids) > 3 * len(records):
            break
    assert max(Counter(ids).values()) > 1


def test_eval_order_is_fixed_and_ranks_share_it_exactly(data):
    tmp_path, records, shards = data
    cfg = config(tmp_path, shards, num_workers=2, batch_size=7)
    in_order = [r["id"] for r in read_records(shards)]
    assert in_order == [r["id"] for r in records]
    assert collect(eval_loader(cfg, rank=0, world_size=1)) == in_order
    assert collect(eval_loader(cfg, rank=0, world_size=1)) == in_order  # the same every time
    parts = [collect(eval_loader(cfg, rank=r, world_size=3)) for r in range(3)]
    assert parts == [in_order[r::3] for r in range(3)]  # no duplicates, ranks differ by <= 1 record
    assert len(eval_loader(cfg, rank=0, world_size=3)) == 6  # ceil(40 / 7)


def test_eval_limit_is_exact_across_ranks_and_records_may_be_given(data):
    """--eval-limit N scores the first N questions, not whole batches past N (2,000 used to score 2,048),
    and the same N whatever the number of processes."""
    tmp_path, records, shards = data
    cfg = config(tmp_path, shards, batch_size=8)
    in_order = [r["id"] for r in records]
    assert collect(eval_loader(cfg, 0, 1, limit=13)) == in_order[:13]
    parts = [collect(eval_loader(cfg, r, 3, limit=13)) for r in range(3)]
    assert parts == [in_order[:13][r::3] for r in range(3)]
    assert collect(eval_loader(cfg, 0, 1, limit=0)) == in_order  # 0: all
    given = [{**records[5], "references": [], "target": ""}, records[2]]  # e.g. a test split's question: no answers
    batch = next(iter(eval_loader(cfg, 0, 1, records=given)))
    assert batch["id"] == [records[5]["id"], records[2]["id"]]
    assert batch["references"][0] == [] and batch["target"][0] == ""
    assert batch["references"][1] == records[2]["references"] and batch["target"][1] == records[2]["target"]


def test_a_question_only_stream_needs_no_cache(data):
    """fuse-train --fuse 0:question without --cache: a stream of questions and answers alone."""
    tmp_path, records, shards = data
    cfg = StreamConfig(shards=shards, caches={}, batch_size=8, num_workers=0, shuffle_buffer=0)
    b = next(iter(train_loader(cfg)))
    assert b["vectors"] == {} and b["ids"] == {} and b["tokens"]["question"][0].shape[0] == 8
    assert [q for b in eval_loader(cfg, 0, 1) for q in b["id"]] == [r["id"] for r in records]
    assert check_stream(cfg).records == len(records)


def test_batch_keys_dtypes_and_shapes(data):
    tmp_path, records, shards = data
    b = next(iter(train_loader(config(tmp_path, shards, shuffle_buffer=0))))
    assert set(b) == {"tokens", "labels", "vectors", "ids", "id", "texts", "target", "references", "groups"}
    assert set(b["tokens"]) == set(b["texts"]) == {"question"}  # the configured text fields only
    input_ids, attention_mask = b["tokens"]["question"]
    n = len(b["id"])
    assert n == 8 and len(b["texts"]["question"]) == len(b["target"]) == len(b["references"]) == len(b["groups"]) == n
    assert input_ids.dtype == attention_mask.dtype == b["labels"].dtype == torch.int64
    assert input_ids.shape == attention_mask.shape and input_ids.shape[0] == n
    assert b["vectors"]["image"].shape == (n, *SHAPE) and b["vectors"]["image"].dtype == torch.float16
    assert set(b["vectors"]) == set(b["ids"]) == {"image"}  # the fields with a cache, not the records' audio
    assert all(type(i) is int for i in b["id"])  # the examples' ids as they were written
    hf = transformers.ByT5Tokenizer()
    for i in range(n):
        rec = next(r for r in records if r["id"] == b["id"][i])
        assert b["ids"]["image"][i] == rec["vectors"]["image"]
        assert b["references"][i] == rec["references"] and len(b["references"][i]) == 10
        assert b["target"][i] == rec["target"] == target_answer(rec["references"])
        assert b["groups"][i] == {"answer_type": "other"}  # these records have no question type
        assert b["texts"]["question"][i] == rec["texts"]["question"]
        ids = input_ids[i][attention_mask[i] == 1].tolist()
        assert ids == hf(rec["texts"]["question"])["input_ids"]  # ends with EOS
        label = b["labels"][i][b["labels"][i] != -100].tolist()
        assert hf.decode(label, skip_special_tokens=True) == b["target"][i] and label[-1] == hf.eos_token_id
    assert (input_ids[attention_mask == 0] == 0).all()  # padded with the pad id
    assert (b["labels"] == -100).any()  # answers of different lengths: padding is ignored


def test_missing_ids_are_counted_with_examples(tmp_path):
    records = make_records(12)
    shards = write_shards(records, tmp_path / "train-%06d.tar")
    ids = sorted({r["vectors"]["image"] for r in records})
    make_cache(tmp_path / "cache", ids, skip={"3", "4", "5", "6", "7", "8", "9"})
    cfg = config(tmp_path, shards)
    with pytest.raises(MissingEmbeddingsError) as e:
        check_stream(cfg)
    assert str(e.value) == (f"cache image ({tmp_path / 'cache'}) lacks 7 of 12 ids, needed by 21 of 36 "
                            "records (e.g. 3, 4, 5, 6, 7, ...): embed them, or allow missing ids "
                            "(--allow-missing) to drop those records")
    assert e.value.missing_ids == ["3", "4", "5", "6", "7", "8", "9"] and e.value.records == 21
    with pytest.raises(MissingEmbeddingsError):
        eval_loader(cfg, rank=0, world_size=1)
    with pytest.raises(MissingIdError, match=r"image id '3' is not in cache .*run the pre-flight check"):
        collect(train_loader(config(tmp_path, shards, shuffle_buffer=0)))

    allowed = config(tmp_path, shards, allow_missing=True, num_workers=2)
    report = check_stream(allowed)
    assert (report.records, report.dropped) == (36, 21)
    assert report.missing == {"image": {"records": 21, "ids": ["3", "4", "5", "6", "7", "8", "9"]}}
    kept = sorted(r["id"] for r in report.kept)
    assert kept == sorted(r["id"] for r in records if r["vectors"]["image"] not in {"3", "4", "5", "6", "7", "8", "9"})
    assert sorted(collect(train_loader(allowed))) == kept
    assert collect(eval_loader(allowed, rank=0, world_size=1)) == [r["id"] for r in report.kept]


def test_a_cache_built_for_another_model_is_refused(data):
    tmp_path, records, shards = data
    cfg = config(tmp_path, shards, expect={"image": {"shape": [196, 768], "producer": {"model": "vit_b"}}})
    for fn in (check_stream, train_loader, lambda c: eval_loader(c, 0, 1)):
        with pytest.raises(MetadataMismatch) as e:
            fn(cfg)
        assert str(e.value) == (f"cache {tmp_path / 'cache'} was built with other settings:\n"
                                "  shape: cache has [16, 32], expected [196, 768]\n"
                                "  producer.model: cache has 'random', expected 'vit_b'")
    ok = config(tmp_path, shards, expect={"image": {"shape": [16, 32], "dtype": "float16"}})
    assert check_stream(ok).dropped == 0


def test_several_vector_fields_each_from_its_own_cache_by_its_own_id(data):
    """An example's ``vectors`` name each field's own cache key: image ``i`` and audio clip ``a{i % 7}``
    (7 clips shared by 40 images), each joined with its own cache."""
    tmp_path, records, shards = data
    make_cache(tmp_path / "audio", sorted({r["vectors"]["audio"] for r in records}), shape=(4, 8), dtype="bfloat16")
    caches = {"image": str(tmp_path / "cache"), "audio": str(tmp_path / "audio")}
    cfg = StreamConfig(shards=shards, caches=caches, batch_size=5, num_workers=2)
    by_id = {r["id"]: r for r in records}
    seen = []
    for b in train_loader(cfg):
        n = len(b["id"])
        audio = b["vectors"]["audio"]
        assert audio.shape == (n, 4, 8) and audio.dtype == torch.bfloat16
        assert b["ids"]["audio"] == [by_id[i]["vectors"]["audio"] for i in b["id"]]  # each example's own audio id
        assert b["ids"]["image"] == [by_id[i]["vectors"]["image"] for i in b["id"]]
        assert audio[:, 0, 0].float().tolist() == [value_of(a) for a in b["ids"]["audio"]]  # joined by that id
        assert b["vectors"]["image"][:, 0, 0].float().tolist() == [value_of(i) for i in b["ids"]["image"]]
        assert b["vectors"]["image"].shape[1:] == SHAPE
        seen += b["id"]
    assert sorted(seen) == sorted(by_id)
    assert check_stream(cfg).dropped == 0  # the pre-flight check looks each field up by its own id too
    make_cache(tmp_path / "few", ["a0", "a1"], shape=(4, 8))
    few = StreamConfig(shards=shards, caches={**caches, "audio": str(tmp_path / "few")}, batch_size=5, num_workers=0)
    with pytest.raises(MissingEmbeddingsError) as e:
        check_stream(few)
    assert e.value.missing_ids == ["a2", "a3", "a4", "a5", "a6"]
    assert e.value.records == sum(r["vectors"]["audio"] not in ("a0", "a1") for r in records)


def test_spawned_workers_get_a_picklable_pipeline(data):
    tmp_path, records, shards = data
    cfg = config(tmp_path, shards, num_workers=1)  # one is enough to prove pickling, and spawns slowly
    seen = collect(train_loader(cfg, multiprocessing_context="spawn"))
    assert sorted(seen) == sorted(r["id"] for r in records)


def test_shards_are_decoded_as_json_only_never_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "evil-000000.tar"
    rec = make_records(1, 1)[0]
    with tarfile.open(path, "w") as t:
        for name, payload in (("100.json", json_bytes([rec])), ("100.pyd", pickle.dumps(Boom())),
                              ("100.pickle", pickle.dumps(Boom()))):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
    make_cache(tmp_path / "cache", ["0"])
    assert collect(train_loader(config(tmp_path, [str(path)]))) == [rec["id"]]
    assert read_records([str(path)])[0] == rec
    assert not os.path.exists(tmp_path / "pwned")


def json_bytes(d):
    import json

    return json.dumps(d).encode()


def test_byte_tokenizer_is_byt5():
    hf = transformers.ByT5Tokenizer()
    texts = ["What color is the circle?", "x", "héllo wörld ✓ 日本", "y" * 300, ""]
    for max_length in (1, 2, 8, 128):
        ref = hf(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        ids, mask = ByteTokenizer().encode_batch(texts, max_length)
        assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    assert isinstance(load_tokenizer("byt5"), ByteTokenizer)
    ids, _ = load_tokenizer("hf:byt5").encode_batch(texts, 128)
    assert torch.equal(ids, ByteTokenizer().encode_batch(texts, 128)[0])


def test_config_is_validated_with_flag_names(data):
    tmp_path, records, shards = data
    with pytest.raises(ValueError, match="^--batch-size 0: must be an integer >= 1$"):
        config(tmp_path, shards, batch_size=0)
    with pytest.raises(ValueError, match="^--cache audio=PATH: 'audio' has an expectation but no cache$"):
        config(tmp_path, shards, expect={"audio": {"shape": [4, 8]}})
    with pytest.raises(ValueError, match="^--cache question=PATH: 'question' is a text field, not a vector field$"):
        StreamConfig(shards=shards, caches={"question": str(tmp_path / "cache")})
    with pytest.raises(ValueError, match="^--text-len question=0: must be a positive integer$"):
        config(tmp_path, shards, texts={"question": 0})
    with pytest.raises(ValueError, match="^--shards: no shard files given$"):
        StreamConfig(shards=[], caches={"image": "c"})
    brace = str(tmp_path / "qa" / "train-{000000..000007}.tar")
    assert config(tmp_path, brace).shards == shards
    from pipelines.errors import PipelineError
    with pytest.raises(PipelineError, match="^--tokenizer /nowhere: cannot load it"):
        train_loader(config(tmp_path, shards, tokenizer="/nowhere"))


def test_loaders_of_one_process_share_the_cache_environment(data):
    tmp_path, records, shards = data
    cfg = config(tmp_path, shards, num_workers=2)
    a, b = train_loader(cfg), eval_loader(cfg, 0, 1)  # LMDB: one environment per file per process
    assert len(collect(a)) == len(collect(b)) == len(records)
    ra, rb = a.attach.readers["image"], b.attach.readers["image"]
    assert ra["0"].shape == rb["0"].shape == SHAPE and ra._env is rb._env  # (readers reopen after forks)
    ra.close()
    assert len(collect(b)) == len(records)  # the other loader's reader still reads


def test_a_10_mb_question_is_tokenized_as_its_first_kilobytes_and_quickly(tmp_path, caplog):
    """A huge text is cut before tokenizing: the word tokenizer took ~10 s a batch over a 10 MB
    question; cut, its tokens are those of the question's first 4 KB, and the batch takes milliseconds."""
    import logging
    import time

    from pipelines.data.tokens import build_word_tokenizer, char_limit

    records = make_records(6)
    huge = "What is " + "red blue " * 1_111_111  # 10 MB of words the tokenizer knows
    records[4]["texts"]["question"] = huge
    build_word_tokenizer([r["texts"]["question"] for r in records if r is not records[4]] + ANSWERS, tmp_path / "words")
    shards = write_shards(records, tmp_path / "qa" / "train-%06d.tar", shard_size=1000)
    make_cache(tmp_path / "cache", sorted({r["vectors"]["image"] for r in records}))
    cfg = config(tmp_path, shards, tokenizer=str(tmp_path / "words"), shuffle_buffer=0, batch_size=len(records))
    with caplog.at_level(logging.WARNING, logger="pipelines.data.batch"):
        t = time.perf_counter()
        (b,) = list(train_loader(cfg))
        elapsed = time.perf_counter() - t
    tokenizer = load_tokenizer(str(tmp_path / "words"))
    max_len = cfg.texts["question"]
    input_ids, _ = b["tokens"]["question"]
    i = b["id"].index(records[4]["id"])
    first_kb, _ = tokenizer.encode_batch([huge[:4096]], max_len)  # (1, 128)
    assert input_ids[i].tolist() == first_kb[0].tolist() and first_kb.shape[1] == max_len == 128
    assert b["texts"]["question"][i] == huge[: char_limit(max_len)]  # what travels from the workers
    for j, r in enumerate(records):  # the others as before
        if j != 4:
            k = b["id"].index(r["id"])
            ids, _ = tokenizer.encode_batch([r["texts"]["question"]], max_len)
            assert input_ids[k][: ids.shape[1]].tolist() == ids[0].tolist()
            assert b["texts"]["question"][k] == r["texts"]["question"]
    assert elapsed < 3.0, elapsed
    warnings = [m for m in caplog.messages if "characters: cut to" in m]
    assert warnings == [(f"example {records[4]['id']}: its question has 10,000,007 characters: cut to "
                         "2,048 before tokenizing (its first 128 tokens are kept either way); other long texts are "
                         "cut without a warning")]
