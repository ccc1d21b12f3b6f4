"""Stage 1 (`embed`), in process: stored values equal the model's own tokens, every source kind,
bad images, resume, the refusal of a cache made by other settings, and the CLI's exit codes and
messages. Subprocess tests (kill-and-resume, the 2-process accelerate launch) are in
test_embed_launch.py.

The model is a real timm ViT (vit_tiny_patch16_224 with 2 blocks at 32x32: 4 patch tokens of 192
dims), randomly initialised, saved as safetensors and reloaded through --checkpoint.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

from embed import EmbedConfig, EmbedError, SourceError, embed, scan
from embed.cli import cli
from embed.decode import BadImage, draft_size, draft_target_of, open_rgb
from store import CacheReader, CacheWriter, MetadataMismatch, verify

MODEL, KWARGS, IMG = "vit_tiny_patch16_224", {"depth": 2}, 32
SHAPE = (4, 192)  # (32 / 16)^2 patch tokens, class token dropped


def make_tiny(path: Path, seed: int = 1):
    """A random tiny ViT saved as safetensors at ``path``; returns the model (eval mode)."""
    torch.manual_seed(seed)
    model = timm.create_model(MODEL, img_size=IMG, **KWARGS).eval()
    save_file(model.state_dict(), str(path))
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    return SimpleNamespace(model=make_tiny(path), path=path)


def model_args(checkpoint) -> list:
    """CLI arguments selecting the tiny model and its checkpoint."""
    return ["--model", MODEL, "--model-kwargs", json.dumps(KWARGS), "--img-size", str(IMG),
            "--checkpoint", str(checkpoint), "--device", "cpu", "--no-progress"]


def config(images, out, checkpoint, **kw) -> EmbedConfig:
    kw = {"num_workers": 0, "batch_size": 8, **kw}
    return EmbedConfig(images=images if isinstance(images, (list, tuple)) else [images], out=out, model=MODEL,
                       model_kwargs=KWARGS, img_size=IMG, checkpoint=str(checkpoint), device="cpu",
                       progress=False, **kw)


def write_images(folder: Path, n: int, fmt: str = "png", size=(48, 40), name="img_{i}", seed=0) -> dict:
    """``n`` random images of ``size`` (w, h); returns ``{stem: path}``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        path = folder / f"{name.format(i=i)}.{fmt}"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        out[path.stem] = path
    return out


def reference(model, img: Image.Image) -> np.ndarray:
    """The model's own tokens for ``img`` through timm's unsplit eval transform: (4, 192) float32."""
    data_config = resolve_data_config({"input_size": (3, IMG, IMG)}, model=model)
    x = create_transform(**data_config)(img.convert("RGB")).unsqueeze(0)  # (1, 3, 32, 32)
    with torch.inference_mode():
        return model.forward_features(x)[0, model.num_prefix_tokens:].numpy()  # (4, 192)


def assert_float16_close(stored, ref):
    assert stored.shape == ref.shape
    np.testing.assert_allclose(stored.astype(np.float32), ref, rtol=2e-3, atol=2e-3)


def read_all(cache) -> dict:
    with CacheReader(cache) as r:
        return {k: r[k] for k in r.keys()}


# -- values -------------------------------------------------------------------------------------

def test_stored_values_equal_the_models_forward_features(tmp_path, tiny):
    paths = write_images(tmp_path / "imgs", 11, size=(48, 40))
    paths.update(write_images(tmp_path / "imgs", 3, fmt="jpg", size=(31, 60), name="tall_{i}", seed=1))
    s = embed(config(tmp_path / "imgs", tmp_path / "cache", tiny.path, draft=False))
    assert (s.total, s.embedded, s.skipped, s.failed) == (14, 14, 0, 0)
    assert s.shape == list(SHAPE) and s.weights == f"checkpoint:{tiny.path.resolve()}"
    stored = read_all(tmp_path / "cache")
    assert sorted(stored) == sorted(paths)
    for image_id, path in paths.items():
        assert_float16_close(stored[image_id], reference(tiny.model, Image.open(path)))
    assert not np.allclose(stored["img_0"], stored["img_1"], atol=1e-2)  # distinct images, distinct values


def test_metadata_records_model_weights_preprocessing_and_versions(tmp_path, tiny):
    write_images(tmp_path / "imgs", 2)
    embed(config(tmp_path / "imgs", tmp_path / "cache", tiny.path))
    with CacheReader(tmp_path / "cache") as r:
        meta = r.meta
    p = meta.producer
    assert meta.shape == SHAPE and meta.dtype == "float16" and meta.count == 2
    assert p["model"] == MODEL and p["model_kwargs"] == {"depth": 2, "img_size": 32}
    assert p["weights"] == f"checkpoint:{tiny.path.resolve()}" and p["weights_hash"].startswith("sha256:")
    assert p["preprocessing"] == {"input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 0.9,
                                  "crop_mode": "center", "mean": [0.5] * 3, "std": [0.5] * 3}
    assert p["tokens"] == "final-norm, prefix tokens dropped" and p["num_prefix_tokens"] == 1
    assert p["versions"] == {"timm": timm.__version__, "torch": torch.__version__}
    assert p["embed_config"]["batch_size"] == 8


def test_layer_minus_2_is_the_penultimate_blocks_output_without_final_norm(tmp_path, tiny):
    paths = write_images(tmp_path / "imgs", 3)
    embed(config(tmp_path / "imgs", tmp_path / "cache", tiny.path, layer=-2))
    m = tiny.model
    data_config = resolve_data_config({"input_size": (3, IMG, IMG)}, model=m)
    with CacheReader(tmp_path / "cache") as r:
        assert r.meta.producer["tokens"] == "block -2 output (no final norm), prefix tokens dropped"
        for image_id, path in paths.items():
            x = create_transform(**data_config)(Image.open(path).convert("RGB")).unsqueeze(0)
            with torch.inference_mode():  # by hand: embeddings, then block 0 of 2
                h = m.blocks[0](m.norm_pre(m._pos_embed(m.patch_embed(x))))
            assert_float16_close(r[image_id], h[0, 1:].numpy())


def test_bfloat16_and_float32_caches(tmp_path, tiny):
    paths = write_images(tmp_path / "imgs", 2)
    for dtype, tol in (("bfloat16", 1e-2), ("float32", 1e-5)):
        embed(config(tmp_path / "imgs", tmp_path / dtype, tiny.path, dtype=dtype, draft=False))
        with CacheReader(tmp_path / dtype) as r:
            assert r.meta.dtype == dtype
            for image_id, path in paths.items():
                np.testing.assert_allclose(r[image_id], reference(tiny.model, Image.open(path)), rtol=tol, atol=tol)


def smooth_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """A photo-like image: smooth colour gradients (noise would make any resampling look different)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    chans = [np.sin(xx * rng.uniform(2, 6) + yy * rng.uniform(2, 6) + rng.uniform(0, 6)) for _ in range(3)]
    return Image.fromarray(((np.stack(chans, -1) + 1) * 127.5).astype(np.uint8))


def test_jpeg_draft_decodes_smaller_but_never_below_the_resize_target(tmp_path, tiny):
    # 35 = floor(32 / 0.9): the shorter side timm resizes to before the 32x32 centre crop
    assert draft_target_of(create_transform(**resolve_data_config({"input_size": (3, 32, 32)}, model=tiny.model),
                                            use_prefetcher=True)) == (35,)
    buf = io.BytesIO()
    smooth_image(400, 300).save(buf, "JPEG", quality=95)
    img = open_rgb(buf.getvalue(), draft_target=(35,))
    assert img.size == (50, 38) and img.mode == "RGB"  # 1/8 scale: 38 >= 35, 1/16 would not be
    assert draft_size((400, 300), (35,)) == (47, 35)
    assert open_rgb(buf.getvalue(), draft_target=(200,)).size == (400, 300)  # 1/2 would be 150 < 200
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "big.jpg").write_bytes(buf.getvalue())
    embed(config(tmp_path / "imgs", tmp_path / "cache", tiny.path))
    with CacheReader(tmp_path / "cache") as r:
        assert "JPEG draft" in r.meta.producer["decode"]
        stored = r["big"].astype(np.float32)
    assert_float16_close(stored, reference(tiny.model, img))  # exactly the drafted pixels through the model
    full = reference(tiny.model, Image.open(tmp_path / "imgs" / "big.jpg"))
    cos = (stored * full).sum() / np.linalg.norm(stored) / np.linalg.norm(full)
    assert cos > 0.99  # and close to what the full decode gives


# -- sources ------------------------------------------------------------------------------------

def test_folder_ids_coco_pattern_and_recursion(tmp_path):
    root = tmp_path / "imgs"
    write_images(root / "train2014", 2, fmt="jpg", name="COCO_train2014_{i:012d}")
    write_images(root / "val2014" / "deep", 1, fmt="jpg", name="COCO_val2014_000000000123")
    write_images(root, 1, name="plain.name")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"")
    refs = scan([root])
    assert sorted(r.id for r in refs) == ["0", "1", "123", "plain.name"]  # the stem: up to the last dot
    assert {r.id: Path(r.path).name for r in refs}["123"] == "COCO_val2014_000000000123.jpg"
    with pytest.raises(SourceError) as e:
        scan([root], id_pattern=r"_(\d+)\.jpg$")
    assert str(e.value) == f"--id-pattern '_(\\d+)\\.jpg$': 1 file name(s) give no id, e.g. {root}/plain.name.png"
    (root / "plain.name.png").unlink()
    assert sorted(r.id for r in scan([root], id_pattern=r"_(\d+)\.jpg$")) == ["000000000000", "000000000001",
                                                                              "000000000123"]


def test_duplicate_ids_are_refused(tmp_path):
    write_images(tmp_path / "a", 1, name="COCO_train2014_000000000007")
    write_images(tmp_path / "b", 1, name="7")
    with pytest.raises(SourceError) as e:
        scan([tmp_path])
    assert str(e.value) == (f"1 duplicate image id(s), e.g. id '7': {tmp_path}/a/COCO_train2014_000000000007.png "
                            f"and {tmp_path}/b/7.png (ids must be unique; see --id-pattern)")


def test_list_file_and_malformed_lines(tmp_path):
    paths = write_images(tmp_path / "imgs", 2)
    lst = tmp_path / "list.tsv"
    lst.write_text(f"# id<TAB>path\n42\timgs/img_0.png\n\n0\t{paths['img_1']}\n")
    refs = scan([lst])
    assert [(r.id, r.path) for r in refs] == [("42", str(tmp_path / "imgs" / "img_0.png")), ("0", str(paths["img_1"]))]
    lst.write_text("42 imgs/img_0.png\n")
    with pytest.raises(SourceError, match=r"list.tsv:1: expected 'id<TAB>path', got '42 imgs/img_0.png'$"):
        scan([lst])


def write_shard(path: Path, samples: dict) -> None:
    """A WebDataset shard written by webdataset's own TarWriter: ``{key: (ext, bytes)}``."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for key, (ext, data) in samples.items():
            sink.write({"__key__": key, ext: data, "json": b"{}"})


def test_every_source_kind_gives_the_same_values(tmp_path, tiny):
    paths = write_images(tmp_path / "imgs", 6, name="{i}")
    (tmp_path / "list.txt").write_text("".join(f"{k}\timgs/{p.name}\n" for k, p in paths.items()))
    blobs = {k: ("png", p.read_bytes()) for k, p in paths.items()}
    write_shard(tmp_path / "s-000.tar", dict(list(blobs.items())[:4]))
    write_shard(tmp_path / "s-001.tar", dict(list(blobs.items())[4:]))
    refs = scan([str(tmp_path / "s-{000..001}.tar")])
    assert [r.id for r in refs] == [str(i) for i in range(6)] and refs[0].member == "0.png"
    caches = {}
    for kind, images in (("folder", [tmp_path / "imgs"]), ("list", [tmp_path / "list.txt"]),
                         ("wds", [str(tmp_path / "s-{000..001}.tar")])):
        s = embed(config(images, tmp_path / kind, tiny.path, num_workers=1))
        assert (s.embedded, s.failed) == (6, 0), kind
        caches[kind] = read_all(tmp_path / kind)
    for image_id, path in paths.items():
        ref = reference(tiny.model, Image.open(path))
        for kind in caches:
            assert_float16_close(caches[kind][image_id], ref)


def test_compressed_or_missing_sources_are_refused(tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(b"")
    with pytest.raises(SourceError, match="x.tar.gz: compressed shards cannot be read by offset"):
        scan([tmp_path / "x.tar.gz"])
    with pytest.raises(SourceError, match=r"nope: no such file or directory$"):
        scan([tmp_path / "nope"])
    (tmp_path / "bad.tar").write_bytes(b"x" * 10)
    with pytest.raises(SourceError, match="bad.tar: not a readable uncompressed tar shard"):
        scan([tmp_path / "bad.tar"])


# -- bad images ---------------------------------------------------------------------------------

def bad_corpus(root: Path) -> tuple[dict, dict]:
    """Writes broken files and odd-mode images; returns ({id: expected reason}, {id: RGB reference image})."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("this is not a PNG")
    Image.new("L", (120, 100)).save(root / "bomb.png")  # 12,000 px > --max-pixels 10,000
    Image.new("L", (300, 300)).save(root / "hugebomb.png")  # > 2x the limit, where PIL itself refuses
    broken = {
        "missing": "file not found",
        "truncated": "truncated or corrupt image: image file is truncated",
        "empty": "empty file (0 bytes)",
        "text": "not an image (no decoder recognises the data)",
        "bomb": "decompression bomb: 120x100 = 12000 pixels exceeds --max-pixels 10000",
        "hugebomb": "decompression bomb: 300x300 = 90000 pixels exceeds --max-pixels 10000",
    }
    odd = {}
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    odd["cmyk"] = Image.open(root / "cmyk.jpg").convert("RGB")
    wide = (rng.integers(0, 65536, (40, 48))).astype(np.uint16)
    Image.fromarray(wide).save(root / "gray16.png")  # mode I;16 (or I): scaled to 8 bits, not clipped
    odd["gray16"] = Image.fromarray(np.rint(wide / 257.0).astype(np.uint8), "L").convert("RGB")
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    pal.save(root / "palette.png", transparency=0)
    odd["palette"] = Image.open(root / "palette.png").convert("RGBA").convert("RGB")
    for name, mode in (("gray", "L"), ("gray_alpha", "LA"), ("rgba", "RGBA"), ("bilevel", "1")):
        Image.fromarray(rgb).convert(mode).save(root / f"{name}.png")
        odd[name] = Image.open(root / f"{name}.png").convert("RGB")
    Image.fromarray(rgb).convert("L").save(root / "gray.jpg")
    odd["grayjpg"] = Image.open(root / "gray.jpg").convert("RGB")
    (root / "gray.jpg").rename(root / "grayjpg.jpg")
    with open(root.parent / "list.txt", "w") as f:
        for p in sorted(root.iterdir()):
            f.write(f"{p.stem}\t{root.name}/{p.name}\n")
        f.write(f"missing\t{root.name}/missing.jpg\n")
    return broken, odd


def test_bad_images_are_reported_and_odd_modes_embedded(tmp_path, tiny):
    broken, odd = bad_corpus(tmp_path / "imgs")
    assert Image.open(tmp_path / "imgs" / "gray16.png").mode in ("I;16", "I")
    assert Image.open(tmp_path / "imgs" / "cmyk.jpg").mode == "CMYK"
    s = embed(config(tmp_path / "list.txt", tmp_path / "cache", tiny.path, max_pixels=10_000, num_workers=1,
                     draft=False))
    assert (s.total, s.embedded, s.failed, s.skipped) == (len(broken) + len(odd), len(odd), len(broken), 0)
    report = tmp_path / "cache.failures.jsonl"
    assert s.failures_path == str(report)
    rows = {d["id"]: d for d in map(json.loads, report.read_text().splitlines())}
    assert sorted(rows) == sorted(broken)
    for image_id, reason in broken.items():
        assert rows[image_id]["reason"].startswith(reason), rows[image_id]
        assert rows[image_id]["path"] == str(tmp_path / "imgs" / Path(rows[image_id]["path"]).name)
    stored = read_all(tmp_path / "cache")
    assert sorted(stored) == sorted(odd)
    for image_id, img in odd.items():
        assert_float16_close(stored[image_id], reference(tiny.model, img))
    # a rerun retries the failed ids only, and rewrites the report
    s = embed(config(tmp_path / "list.txt", tmp_path / "cache", tiny.path, max_pixels=10_000, draft=False))
    assert (s.embedded, s.skipped, s.failed) == (0, len(odd), len(broken))
    assert len(report.read_text().splitlines()) == len(broken)


def test_a_fifo_among_the_images_is_reported_and_never_opened(tmp_path, tiny):
    paths = write_images(tmp_path / "imgs", 3)
    os.mkfifo(tmp_path / "imgs" / "x.jpg")  # opening it would wait for a writer forever
    (tmp_path / "imgs" / "link.png").symlink_to(paths["img_0"])  # a symlink to a regular file is read
    cmd = [sys.executable, "-m", "embed", str(tmp_path / "imgs"), "--out", str(tmp_path / "cache"),
           *model_args(tiny.path), "--num-workers", "0", "--json"]
    r = subprocess.run(cmd, check=False, capture_output=True, timeout=60)  # a hang fails the test (TimeoutExpired)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    summary = json.loads(r.stdout)
    assert (summary["embedded"], summary["failed"]) == (4, 1)
    rows = [json.loads(line) for line in (tmp_path / "cache.failures.jsonl").read_text().splitlines()]
    assert rows == [{"id": "x", "path": str(tmp_path / "imgs" / "x.jpg"),
                     "reason": "cannot read: not a regular file (FIFO)"}]
    assert sorted(read_all(tmp_path / "cache")) == ["img_0", "img_1", "img_2", "link"]


def test_open_rgb_refuses_what_it_cannot_decode():
    with pytest.raises(BadImage, match=r"^empty file \(0 bytes\)$"):
        open_rgb(b"")
    with pytest.raises(BadImage, match=r"^not an image"):
        open_rgb(b"GIF89a garbage")
    prev = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadImage, match="exceeds --max-pixels 10"):
        buf = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buf, "PNG")
        open_rgb(buf.getvalue(), max_pixels=10)
    assert Image.MAX_IMAGE_PIXELS == prev  # PIL's global setting is restored
    # over twice the limit PIL raises its own error, quoting twice the limit: the reason quotes ours
    buf = io.BytesIO()
    Image.new("L", (300, 300)).save(buf, "PNG")
    with pytest.raises(BadImage, match=r"^decompression bomb: 300x300 = 90000 pixels exceeds --max-pixels 10000$"):
        open_rgb(buf.getvalue(), max_pixels=10_000)
    assert Image.MAX_IMAGE_PIXELS == prev


# -- resume and refusal -------------------------------------------------------------------------

def test_rerun_skips_present_ids_and_adds_new_ones(tmp_path, tiny):
    write_images(tmp_path / "imgs", 5)
    s = embed(config(tmp_path / "imgs", tmp_path / "cache", tiny.path))
    assert (s.embedded, s.skipped) == (5, 0)
    first = read_all(tmp_path / "cache")
    write_images(tmp_path / "imgs", 3, name="new_{i}", seed=9)
    s = embed(config(tmp_path / "imgs", tmp_path / "cache", tiny.path, batch_size=2))
    assert (s.total, s.embedded, s.skipped, s.failed) == (8, 3, 5, 0)
    after = read_all(tmp_path / "cache")
    assert len(after) == 8 and all(np.array_equal(first[k], after[k]) for k in first)
    assert verify(tmp_path / "cache")["bad"] == []


def test_cache_of_other_weights_or_preprocessing_is_refused(tmp_path, tiny):
    write_images(tmp_path / "imgs", 2)
    embed(config(tmp_path / "imgs", tmp_path / "cache", tiny.path))
    other = make_tiny(tmp_path / "other.safetensors", seed=2)
    with pytest.raises(MetadataMismatch) as e:
        embed(config(tmp_path / "imgs", tmp_path / "cache", tmp_path / "other.safetensors"))
    assert [d[0] for d in e.value.diffs] == ["producer.weights_hash"]
    assert str(e.value).startswith(f"cache {tmp_path / 'cache'} was built with other settings:\n"
                                   "  producer.weights_hash: cache has 'sha256:")
    del other
    with pytest.raises(MetadataMismatch) as e:  # another input size: shape, kwargs and preprocessing differ
        embed(EmbedConfig(images=[tmp_path / "imgs"], out=tmp_path / "cache", model=MODEL, model_kwargs=KWARGS,
                          img_size=48, checkpoint=str(tiny.path), device="cpu", num_workers=0, progress=False))
    assert {d[0] for d in e.value.diffs} == {"shape", "producer.model_kwargs.img_size", "producer.weights_hash",
                                             "producer.preprocessing.input_size"}
    with pytest.raises(MetadataMismatch, match="producer.tokens: cache has 'final-norm, prefix tokens dropped'"):
        embed(config(tmp_path / "imgs", tmp_path / "cache", tiny.path, layer=-1))
    assert len(read_all(tmp_path / "cache")) == 2  # never mixed


def test_same_weights_elsewhere_or_other_versions_are_not_refused(tmp_path, tiny):
    write_images(tmp_path / "imgs", 2)
    embed(config(tmp_path / "imgs", tmp_path / "cache", tiny.path))
    with CacheWriter(tmp_path / "cache", shape=SHAPE) as w:  # as if an older timm had built it
        w.update_producer(versions={"timm": "0.9.0", "torch": "2.0"})
    moved = tmp_path / "moved.safetensors"
    moved.write_bytes(tiny.path.read_bytes())
    write_images(tmp_path / "imgs", 1, name="more")
    s = embed(config(tmp_path / "imgs", tmp_path / "cache", moved, batch_size=3))
    assert (s.embedded, s.skipped) == (1, 2)
    with CacheReader(tmp_path / "cache") as r:
        assert r.meta.producer["weights"] == f"checkpoint:{moved.resolve()}"
        assert r.meta.producer["versions"]["timm"] == timm.__version__


def test_random_weights_are_seeded_and_say_so(tmp_path, caplog):
    write_images(tmp_path / "imgs", 2)
    cfg = dict(images=[tmp_path / "imgs"], model=MODEL, model_kwargs=KWARGS, img_size=IMG, device="cpu",
               num_workers=0, progress=False)
    with caplog.at_level("WARNING", logger="embed.model"):
        s = embed(EmbedConfig(out=tmp_path / "a", **cfg))
    assert s.weights == "random" and "RANDOM WEIGHTS: vit_tiny_patch16_224 is randomly initialised" in caplog.text
    embed(EmbedConfig(out=tmp_path / "b", **cfg))
    a, b = read_all(tmp_path / "a"), read_all(tmp_path / "b")
    assert all(np.array_equal(a[k], b[k]) for k in a)  # the same seed, the same weights
    with CacheReader(tmp_path / "a") as r:
        assert r.meta.producer["weights"] == "random"
    with pytest.raises(MetadataMismatch, match="producer.weights_hash"):
        embed(EmbedConfig(out=tmp_path / "a", seed=1, **cfg))


def test_background_writer_error_reaches_the_forward_loop(tmp_path):
    from embed.writer import BackgroundWriter

    class Failing:
        def put_batch(self, ids, values):
            raise OSError("disk full")

        def flush(self):
            pass

    w = BackgroundWriter(Failing(), depth=1)
    w.put(["0"], np.zeros((1, 2)))
    with pytest.raises(OSError, match="disk full"):
        w.close()


# -- CLI ----------------------------------------------------------------------------------------

def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_cli_embeds_prints_a_summary_and_exits_0(tmp_path, tiny):
    write_images(tmp_path / "imgs", 3)
    r = run_cli(tmp_path / "imgs", "--out", tmp_path / "cache", *model_args(tiny.path), "--num-workers", "0")
    assert r.exit_code == 0, r.output
    assert "embedded   3\n" in r.stdout and "skipped    0 (already in the cache)\n" in r.stdout
    assert "images/s" in r.stdout and "decode" in r.stdout
    r = run_cli(tmp_path / "imgs", "--out", tmp_path / "cache", *model_args(tiny.path), "--num-workers", "0",
                "--json")
    d = json.loads(r.stdout)
    assert (d["embedded"], d["skipped"], d["failed"], d["shape"]) == (0, 3, 0, list(SHAPE))


def test_cli_help_has_an_example():
    r = run_cli("--help")
    assert r.exit_code == 0 and "Example:" in r.output and "accelerate launch" in r.output


@pytest.mark.parametrize("args, message", [
    (["--pretrained", "--checkpoint", "{ckpt}"],
     "--pretrained and --checkpoint exclude each other: choose one source of weights"),
    (["--checkpoint", "{tmp}/nope.safetensors"], "--checkpoint {tmp}/nope.safetensors: no such file"),
    (["--id-pattern", "(a)(b)"], "--id-pattern '(a)(b)': needs exactly one group (the id), has 2"),
    (["--batch-size", "0"], "--batch-size 0: must be a positive integer"),
    (["--model-kwargs", "[1]"], "--model-kwargs '[1]': must be a JSON object, e.g. '{\"depth\": 2}'"),
    (["--device", "tpu"], "--device tpu: use cpu, cuda or cuda:N"),
    (["--device", "cpu", "--decode-on-device"], "--decode-on-device needs a CUDA device, not --device cpu"),
])
def test_cli_usage_errors_exit_2(tmp_path, tiny, args, message):
    args = [a.format(ckpt=tiny.path, tmp=tmp_path) for a in args]
    r = run_cli(tmp_path, "--out", tmp_path / "cache", *args)
    assert r.exit_code == 2
    assert r.stderr.endswith(f"Error: {message.replace('{tmp}', str(tmp_path))}\n")


def test_cli_errors_exit_1_with_the_reason(tmp_path, tiny):
    write_images(tmp_path / "imgs", 2)
    r = run_cli(tmp_path / "imgs", "--out", tmp_path / "c", "--model", "no_such_model", "--device", "cpu")
    assert (r.exit_code, r.stderr) == (1, "Error: --model no_such_model: timm has no such model "
                                          "(see timm.list_models())\n")
    r = run_cli(tmp_path / "nope", "--out", tmp_path / "c", *model_args(tiny.path))
    assert (r.exit_code, r.stderr) == (1, f"Error: {tmp_path / 'nope'}: no such file or directory\n")
    assert run_cli(tmp_path / "imgs", "--out", tmp_path / "c", *model_args(tiny.path)).exit_code == 0
    other = tmp_path / "other.safetensors"
    make_tiny(other, seed=3)
    r = run_cli(tmp_path / "imgs", "--out", tmp_path / "c", *model_args(other))
    assert r.exit_code == 1
    assert r.stderr.startswith(f"Error: cache {tmp_path / 'c'} was built with other settings:\n"
                               "  producer.weights_hash: cache has 'sha256:")
    (tmp_path / "w.bin").write_bytes(b"\x80\x04not a state dict")
    r = run_cli(tmp_path / "imgs", "--out", tmp_path / "d", *model_args(tmp_path / "w.bin"))
    assert r.exit_code == 1 and r.stderr.startswith(f"Error: --checkpoint {tmp_path / 'w.bin'}: cannot read weights")
    small = tmp_path / "small.safetensors"
    save_file(timm.create_model(MODEL, img_size=IMG, depth=1).state_dict(), str(small))
    r = run_cli(tmp_path / "imgs", "--out", tmp_path / "d", *model_args(small))
    assert r.exit_code == 1 and r.stderr == (
        f"Error: --checkpoint {small}: does not fit {MODEL}: missing 12 key(s), e.g. blocks.1.norm1.weight, "
        "blocks.1.norm1.bias, blocks.1.attn.qkv.weight (another model or --model-kwargs?)\n")


def test_cli_strict_exits_1_when_an_image_failed(tmp_path, tiny):
    write_images(tmp_path / "imgs", 2)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    args = [tmp_path / "imgs", "--out", tmp_path / "cache", *model_args(tiny.path), "--num-workers", "0"]
    r = run_cli(*args)
    assert r.exit_code == 0 and f"failed     1 (see {tmp_path}/cache.failures.jsonl)\n" in r.stdout
    r = run_cli(*args, "--strict")
    assert r.exit_code == 1
    assert r.stderr.endswith(f"Error: 1 image(s) failed (--strict); see {tmp_path}/cache.failures.jsonl\n")


def test_config_derived_paths(tmp_path):
    c = EmbedConfig(images="imgs", out="runs/cache")
    assert (c.failures_path(), c.part_path(1)) == (Path("runs/cache.failures.jsonl"), Path("runs/cache.part1"))
    assert c.images == ("imgs",) and c.model == "vit_base_patch16_224"
    with pytest.raises(ValueError, match="^--out runs: the cache cannot be one of the image sources$"):
        EmbedConfig(images=["runs"], out="runs")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(EmbedError, match="^--id-pattern applies to folder sources; .*x.txt is read as a list source$"):
        scan([tmp_path / "x.txt"], id_pattern="(x)")


def test_checkpoint_formats_pth_and_nested_state_dict_load_and_pickled_objects_do_not(tmp_path, tiny):
    write_images(tmp_path / "imgs", 2)
    embed(config(tmp_path / "imgs", tmp_path / "a", tiny.path))
    torch.save({"state_dict": tiny.model.state_dict()}, tmp_path / "w.pth")  # timm unwraps "state_dict"
    s = embed(config(tmp_path / "imgs", tmp_path / "a", tmp_path / "w.pth"))
    assert (s.skipped, s.weights) == (2, f"checkpoint:{(tmp_path / 'w.pth').resolve()}")  # same weights_hash
    torch.save({"model": SimpleNamespace(a=1)}, tmp_path / "evil.pt")
    with pytest.raises(EmbedError, match=r"--checkpoint .*evil.pt: cannot read weights .*weights_only=True blocked"):
        embed(config(tmp_path / "imgs", tmp_path / "b", tmp_path / "evil.pt"))


def test_device_decode_path_matches_pil_closely(tiny):
    """The --decode-on-device resize/crop, run here on the CPU (nvjpeg needs CUDA): same size, close pixels."""
    from embed.gpu import decode_resize_crop

    data_config = resolve_data_config({"input_size": (3, IMG, IMG)}, model=tiny.model)
    pil = create_transform(**data_config, use_prefetcher=True)
    blobs, expected = [], []
    for seed, (w, h) in enumerate([(64, 48), (40, 90)]):
        buf = io.BytesIO()
        smooth_image(w, h, seed).save(buf, "JPEG", quality=95)
        blobs.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
        expected.append(pil(Image.open(buf).convert("RGB")).float())
    blobs.append(torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0 broken"), dtype=torch.uint8))
    pixels, failed = decode_resize_crop(blobs, data_config, "cpu")
    assert failed == [2] and pixels.shape == (2, 3, IMG, IMG)
    assert (pixels - torch.stack(expected)).abs().mean() < 2.0  # of 255: resampling differs, content does not


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_and_device_decode_stay_close_to_the_cpu_values(tmp_path, tiny):
    paths = write_images(tmp_path / "imgs", 6, fmt="jpg", size=(64, 48))
    embed(config(tmp_path / "imgs", tmp_path / "cpu", tiny.path, draft=False))
    cuda = config(tmp_path / "imgs", tmp_path / "cuda", tiny.path, draft=False)
    cuda.device, cuda.decode_on_device, cuda.num_workers = "cuda", True, 1
    s = embed(cuda)
    assert (s.embedded, s.failed) == (len(paths), 0)
    a, b = read_all(tmp_path / "cpu"), read_all(tmp_path / "cuda")
    for k in a:
        x, y = a[k].astype(np.float32).ravel(), b[k].astype(np.float32).ravel()
        assert x @ y / np.linalg.norm(x) / np.linalg.norm(y) > 0.98
