"""Fixtures of the published annotation formats (VGGSound, AudioSet, VALOR), a few rows each, and
tiny clips written with PyAV (an mp4 with a video track and an AAC audio track), for
tests/test_avsets.py and the README's recipes."""

from pathlib import Path

import av
import numpy as np

SR = 16000

# vggsound.csv as published: no header; YouTube ID, start seconds, label, split; a label with a comma quoted
VGGSOUND_CSV = """\
---g-f_I2yQ,1,people marching,test
--0PQM4-hqg,30,waterfall burbling,train
0_8-g2rof7E,49,"heart sounds, heartbeat",train
-XxUW9gW6mc,60,wind rustling leaves,train
--56QUhyDQM,185,playing tennis,test
gone0000000,10,people marching,train
"""

# an AudioSet segments CSV as published: three '#' lines, then ', '-separated fields, label ids quoted
AUDIOSET_EVAL_CSV = """\
# Segments csv created Sun Mar  5 10:54:25 2017
# num_ytids=3, num_segs=3, num_unique_labels=3, num_positive_labels=4
# YTID, start_seconds, end_seconds, positive_labels
--4gqARaEJE, 0.000, 10.000, "/m/068hy,/m/07q6cd_,/m/0bt9lr"
--BfvyPmVMo, 20.000, 30.000, "/m/03l9g"
"""
AUDIOSET_TRAIN_CSV = """\
# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=3, num_segs=3, num_unique_labels=4, num_positive_labels=5
# YTID, start_seconds, end_seconds, positive_labels
--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"
--ZhevVpy1s, 50.000, 60.000, "/m/012xff"
--aE2O5G5WE, 0.000, 10.000, "/m/03fwl,/m/04rlf,/m/09x0r"
"""
# ontology.json: a JSON list of classes as published (id, name, description, citation_uri, positive_examples,
# child_ids, restrictions), a few of its 632
ONTOLOGY = [
    {"id": "/m/09x0r", "name": "Speech", "description": "Speech is the vocal ...", "citation_uri": "",
     "positive_examples": [], "child_ids": ["/m/05zppz"], "restrictions": []},
    {"id": "/m/05zppz", "name": "Male speech, man speaking", "description": "", "citation_uri": "",
     "positive_examples": [], "child_ids": [], "restrictions": []},
    {"id": "/m/068hy", "name": "Domestic animals, pets", "description": "", "citation_uri": "",
     "positive_examples": [], "child_ids": [], "restrictions": []},
    {"id": "/m/0bt9lr", "name": "Dog", "description": "", "citation_uri": "", "positive_examples": [],
     "child_ids": [], "restrictions": []},
    {"id": "/m/07q6cd_", "name": "Squeak", "description": "", "citation_uri": "", "positive_examples": [],
     "child_ids": [], "restrictions": []},
    {"id": "/m/03l9g", "name": "Hammer", "description": "", "citation_uri": "", "positive_examples": [],
     "child_ids": [], "restrictions": []},
    {"id": "/t/dd00088", "name": "Gush", "description": "", "citation_uri": "", "positive_examples": [],
     "child_ids": [], "restrictions": []},
    {"id": "/m/012xff", "name": "Toothbrush", "description": "", "citation_uri": "", "positive_examples": [],
     "child_ids": [], "restrictions": []},
    {"id": "/m/03fwl", "name": "Goat", "description": "", "citation_uri": "", "positive_examples": [],
     "child_ids": [], "restrictions": []},
    {"id": "/m/04rlf", "name": "Music", "description": "", "citation_uri": "", "positive_examples": [],
     "child_ids": [], "restrictions": []},
]

# VALOR-32K desc_*.json: a JSON list of {"video_id", "desc"}; one clip with several captions (a list, and
# a second record of the same video_id)
VALOR_TRAIN_JSON = """[
  {"video_id": "-0xCdbjIxuE_000012_000022", "desc": "A man speaks while a dog barks in a yard."},
  {"video_id": "0A8b2cXyZ1Q_000030_000040", "desc": "Rain falls on a tin roof as thunder rumbles."},
  {"video_id": "1bC3dEfGh2I_000005_000015", "desc": "A woman plays a piano in a quiet room."}
]
"""
VALOR_TEST_JSON = """[
  {"video_id": "2cD4eFgHi3J_000100_000110",
   "desc": ["A crowd cheers as a car races past.", "Cars race by while people cheer loudly."]},
  {"video_id": "2cD4eFgHi3J_000100_000110", "desc": "People cheer at a car race."},
  {"video_id": "3dE5fGhIj4K_000000_000010", "desc": "A child laughs while a cat meows."}
]
"""

VGGSOUND_CLIPS = ["---g-f_I2yQ_000001", "--0PQM4-hqg_000030", "0_8-g2rof7E_000049", "-XxUW9gW6mc_000060",
                  "--56QUhyDQM_000185"]  # gone0000000_000010 is missing on purpose
AUDIOSET_CLIPS = ["--4gqARaEJE_000000", "--BfvyPmVMo_000020", "--PJHxphWEs_000030", "--ZhevVpy1s_000050",
                  "--aE2O5G5WE_000000"]
VALOR_CLIPS = ["-0xCdbjIxuE_000012_000022", "0A8b2cXyZ1Q_000030_000040", "1bC3dEfGh2I_000005_000015",
               "2cD4eFgHi3J_000100_000110", "3dE5fGhIj4K_000000_000010"]


def write_clip(path: Path, seed: int, seconds: float = 1.0, frames: int = 4) -> Path:
    """An mp4: ``frames`` frames of a random 6x6 pattern (48x48, mpeg4, 4 fps) and ``seconds`` of a tone
    (AAC, 16 kHz mono) whose pitch depends on ``seed``."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as c:
        v = c.add_stream("mpeg4", rate=4)
        v.width, v.height, v.pix_fmt = 48, 48, "yuv420p"
        a = c.add_stream("aac", rate=SR)
        a.layout = "mono"
        for _ in range(frames):
            img = np.kron(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        t = np.arange(int(seconds * SR)) / SR
        wave = (0.3 * np.sin(2 * np.pi * (300 + 100 * seed) * t)).astype(np.float32)
        size = a.codec_context.frame_size or 1024
        for k in range(0, len(wave), size):
            frame = av.AudioFrame.from_ndarray(wave[None, k:k + size], format="flt", layout="mono")
            frame.sample_rate, frame.pts = SR, k
            for p in a.encode(frame):
                c.mux(p)
        for p in a.encode():
            c.mux(p)
    return path


def write_fixtures(root: Path) -> Path:
    """The three sets under ``root`` as a user would hold them: ``vggsound/`` (vggsound.csv, clips/;
    one clip missing), ``audioset/`` (eval_segments.csv, balanced_train_segments.csv, ontology.json,
    clips/; one clip not a video) and ``valor/`` (desc_train.json, desc_test.json, clips/)."""
    import json

    files = {"vggsound": {"vggsound.csv": VGGSOUND_CSV},
             "audioset": {"eval_segments.csv": AUDIOSET_EVAL_CSV, "balanced_train_segments.csv": AUDIOSET_TRAIN_CSV,
                          "ontology.json": json.dumps(ONTOLOGY, indent=1)},
             "valor": {"desc_train.json": VALOR_TRAIN_JSON, "desc_test.json": VALOR_TEST_JSON}}
    names = {"vggsound": VGGSOUND_CLIPS, "audioset": AUDIOSET_CLIPS, "valor": VALOR_CLIPS}
    for seed, (fmt, texts) in enumerate(files.items()):
        clips = root / fmt / "clips"
        clips.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            (root / fmt / name).write_text(text)
        for k, name in enumerate(names[fmt]):
            if name == "--ZhevVpy1s_000050":
                (clips / f"{name}.mp4").write_bytes(b"not a video at all")  # fails to decode: listed, left out
            else:
                write_clip(clips / f"{name}.mp4", (seed + k) % 7)
    return root


if __name__ == "__main__":  # python tests/avsets_fixtures.py DIR: the fixtures the README's recipes run on
    import sys

    write_fixtures(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
