"""The README's VQA v2 protocol, run as written: its block of commands, in the small VQA v2-layout folder
that the README's next block makes (train and val splits of the shapes data, a test-dev questions file
without annotations, the images apart in coco/). Every command runs for real, in a subprocess."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- tests/test_readme_protocol.py runs this block as written"


def console_blocks(text: str, after: str, count: int) -> list:
    """The commands (``$ `` lines) of the first ``count`` console blocks after ``after``."""
    blocks = re.findall(r"```console\n(.*?)```", text[text.index(after):], flags=re.S)[:count]
    return [[line[2:] for line in block.splitlines() if line.startswith("$ ")] for block in blocks]


def run_all(commands, cwd):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    outputs = []
    for command in commands:
        p = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, f"$ {command}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        outputs.append(p.stdout)
    return outputs


def test_the_readme_vqa_v2_protocol_runs_as_written(tmp_path):
    protocol, make = console_blocks(README.read_text(), MARKER, 2)
    assert protocol[0].startswith("vqa-data shards vqa data/qa --train-splits train --eval-splits val")
    run_all(make, tmp_path)
    out = dict(zip(protocol, run_all(protocol, tmp_path)))

    manifest = json.loads((tmp_path / "data/qa/manifest.json").read_text())
    assert (manifest["train"]["images"], manifest["select"]["images"], manifest["eval"]["images"]) == (380, 20, 100)
    assert manifest["eval"]["count"] == 500 and manifest["train"]["count"] + manifest["select"]["count"] == 2000

    results = json.loads((tmp_path / "runs/vqa/results.json").read_text())
    assert results["selection_side"] == "select" and results["stopped"] is False
    assert results["eval"]["count"] == 500 and results["eval"]["step"] == results["best"]["step"]
    assert all(h["count"] == 100 for h in results["history"])  # the select side: 20 images

    val = json.loads((tmp_path / "vqa/v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    answers = json.loads((tmp_path / "runs/vqa/val_results.json").read_text())
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in val]
    assert all(set(a) == {"question_id", "answer"} and isinstance(a["answer"], str) for a in answers)
    table = next(v for k, v in out.items() if "--split val" in k)
    assert table.startswith("runs/vqa/checkpoints/best: 500 questions (val split)\n")
    all_row = next(line for line in table.splitlines() if line.startswith("all "))
    assert f"{100 * results['eval']['accuracy']:.2f}%" in all_row  # fuse-eval's figure is results.json's

    test_dev = json.loads((tmp_path / "vqa/v2_OpenEnded_mscoco_test-dev2015_questions.json").read_text())["questions"]
    answered = json.loads((tmp_path / "runs/vqa/test-dev_results.json").read_text())
    assert [a["question_id"] for a in answered] == [q["question_id"] for q in test_dev] and len(answered) == 250
    assert not (tmp_path / "vqa/v2_mscoco_test-dev2015_annotations.json").exists()

    question_only = json.loads((tmp_path / "runs/question-only/results.json").read_text())
    assert question_only["config"]["caches"] == {} and question_only["eval"]["count"] == 500
