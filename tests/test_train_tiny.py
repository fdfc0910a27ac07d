"""scripts/train_tiny.py: a few steps on a small slice of the corpus write a checkpoint that loads."""
import importlib.util
import json
import math
import os

import pytest
import torch

from qwen3moe_tutorial.config import preset
from qwen3moe_tutorial.weights import MANIFEST, Checkpoint, expected_shapes, read_manifest, verify_manifest

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "train_tiny.py")


@pytest.fixture(scope="module")
def train_tiny():
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_a_verified_checkpoint_and_learns(tmp_path, train_tiny, capsys):
    out, result = tmp_path / "ckpt", tmp_path / "train.json"
    threads = torch.get_num_threads()
    assert train_tiny.main(["--out", str(out), "--quick", "--steps", "4", "--threads", "1",
                            "--result", str(result)]) == 0
    assert "held-out loss" in capsys.readouterr().out
    r = json.load(open(result))
    losses = [row["loss"] for row in r["train_loss"]]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all(math.isfinite(row["aux_loss"]) for row in r["train_loss"])       # router loss was on
    assert r["held_out"][0]["step"] == 0 and r["held_out"][-1]["step"] == 4
    assert math.isclose(r["final"]["held_out_perplexity"], math.exp(r["final"]["held_out_loss"]))
    assert r["corpus"]["license"].startswith("Python Software Foundation License")
    assert r["corpus"]["held_out_documents"] >= 1 and len(r["corpus"]["sha256"]) == 64
    assert r["machine"]["threads"] == 1 and r["versions"]["tokenizers"]
    assert r["command"].endswith("--quick --steps 4 --threads 1 --result " + str(result))
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()   # restored

    sums = read_manifest(str(out))
    assert sums == r["checkpoint"]["sha256"]
    assert set(sums) == set(os.listdir(out)) - {MANIFEST}
    verify_manifest(str(out))
    ckpt = Checkpoint(str(out))
    assert set(ckpt.keys()) == set(expected_shapes(preset("tiny")))
    ckpt.validate()


def test_same_command_same_bytes(tmp_path, train_tiny):
    for name in ("a", "b"):
        assert train_tiny.main(["--out", str(tmp_path / name), "--quick", "--steps", "2", "--threads", "1"]) == 0
    assert read_manifest(str(tmp_path / "a")) == read_manifest(str(tmp_path / "b"))


def test_corpus_is_deterministic_prose(train_tiny):
    a = train_tiny.build_corpus(60_000)
    b = train_tiny.build_corpus(60_000)
    assert a[2]["sha256"] == b[2]["sha256"] and a[0] == b[0]
    assert a[2]["chars"] <= 60_000 and not any(">>>" in d or "****" in d for d in a[0] + a[1])
    assert train_tiny.normalise("Title\n*****\n\nOne line\n  wrapped here.\n\n   code = 1\n\n>>> 1 + 1\n2") \
        == "Title\nOne line wrapped here."


def test_bad_arguments_give_one_line(tmp_path, train_tiny, capsys):
    assert train_tiny.main(["--out", str(tmp_path / "x"), "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --steps must be at least 1, got 0"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert train_tiny.main(["--out", str(tmp_path / "full"), "--quick"]) == 2
    assert "not an empty directory" in capsys.readouterr().err
