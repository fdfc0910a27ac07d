"""qwen3moe_tutorial.book: the fit check that keeps a notebook cell on one device, rehearsed on a CPU
with a fake small device memory ($QWEN3MOE_DEVICE_MEMORY), and the helpers the chapters share."""
from __future__ import annotations

import pytest
import torch

from qwen3moe_tutorial import book, platform, roofline
from qwen3moe_tutorial.config import preset
from qwen3moe_tutorial.weights import make_tiny_checkpoint

Q30 = preset("qwen3-30b-a3b")


@pytest.mark.parametrize("text, expected", [("4096", 4096), ("64GB", 64 * 10**9), ("1.5 GiB", int(1.5 * 2**30)),
                                            ("512mib", 512 * 2**20), (" 2 KB ", 2000)])
def test_parse_bytes(text, expected):
    assert platform.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "0", "12 PB", "1e9"])
def test_parse_bytes_rejects_with_one_line(text):
    with pytest.raises(ValueError, match="QWEN3MOE_DEVICE_MEMORY=.*expected a positive number of bytes"):
        platform.parse_bytes(text)


def test_device_memory_is_overridden_by_the_environment(monkeypatch):
    monkeypatch.delenv(platform.DEVICE_MEMORY_ENV, raising=False)
    assert platform.device_memory_bytes("cpu") > 10**9                  # this machine's RAM
    monkeypatch.setenv(platform.DEVICE_MEMORY_ENV, "64GB")
    assert platform.device_memory_bytes("cpu") == 64 * 10**9


def test_a3_die_rejects_30b_on_one_die_and_takes_it_at_tp_8(monkeypatch):
    """Qwen3-30B-A3B in bf16 on 64 GB dies: TP 1 does not fit (61 GB of weights > 85 %), TP 2 and 8 do;
    float32 (HF's reference dtype) does not fit at TP 1 or 2."""
    monkeypatch.setattr(platform, "device_memory_bytes", lambda kind: 64 * 10**9)
    monkeypatch.setattr(platform, "device_count", lambda kind: 16)
    one = book.check_fit(Q30, 1, dtype=torch.bfloat16, device_kind="npu")
    assert not one.fits and one.bytes_per_rank == roofline.resident_bytes_per_rank(Q30, 1, 2)
    # before moe_tp_w13_swiglu every rank holds every expert whole: TP 8 does not help yet
    whole = book.check_fit(Q30, 8, dtype=torch.bfloat16, device_kind="npu", step="merged_qkv")
    assert not whole.fits and whole.bytes_per_rank == roofline.resident_bytes_at_step(Q30, 8, "merged_qkv", 2)
    assert whole.bytes_per_rank > 7 * roofline.resident_bytes_per_rank(Q30, 8, 2)
    assert book.check_fit(Q30, 8, dtype=torch.bfloat16, device_kind="npu", step="moe_tp_w13_swiglu").fits
    assert "needs 61.1 GB of weights per device, more than 85% of this npu's 64 GB" in one.reason
    assert book.check_fit(Q30, 2, dtype=torch.bfloat16, device_kind="npu").fits
    assert book.check_fit(Q30, 8, dtype=torch.bfloat16, device_kind="npu").fits
    assert not book.check_fit(Q30, 2, dtype=torch.float32, device_kind="npu").fits
    # HF and ours side by side need a device each: 16 devices hold two TP 8 copies, not two TP 16 ones
    assert book.check_fit(Q30, 8, copies=2, dtype=torch.bfloat16, device_kind="npu").fits
    many = book.check_fit(Q30, 16, copies=2, dtype=torch.bfloat16, device_kind="npu")
    assert not many.fits and "need 32 devices" in many.reason


def test_cpu_ranks_share_ram_unless_a_device_size_is_given(monkeypatch):
    monkeypatch.delenv(platform.DEVICE_MEMORY_ENV, raising=False)
    monkeypatch.setattr(platform, "device_memory_bytes", lambda kind: 100 * 10**9)
    shared = book.check_fit(Q30, 4, copies=2, dtype=torch.bfloat16, device_kind="cpu")
    assert shared.bytes_per_device == shared.bytes_per_rank * 8 and not shared.fits     # 8 ranks' slices in one RAM
    monkeypatch.setenv(platform.DEVICE_MEMORY_ENV, "100GB")
    assert book.check_fit(Q30, 4, copies=2, dtype=torch.bfloat16, device_kind="cpu").fits


@pytest.fixture(scope="module")
def bigger_ckpt(tmp_path_factory):
    """A checkpoint larger than the embedded default: the `mini` shape with random weights."""
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("bigger")), "mini", seed=3, max_shard_size="200MB")


def test_a_cell_too_big_for_the_fake_device_runs_on_the_embedded_model(bigger_ckpt, monkeypatch, capsys):
    """QWEN3MOE_MODEL_PATH at a bigger model, each device 1.5x one TP 2 rank's weights: TP 1 falls back to
    the embedded default with a note naming the reason, TP 2 keeps the bigger model; HF and ours at once
    (two copies at TP 1) fall back too."""
    monkeypatch.setenv("QWEN3MOE_MODEL_PATH", bigger_ckpt)
    chapter = book.Chapter("aiv", quiet=True)
    assert not chapter.embedded and chapter.cfg.hidden_size == preset("mini").hidden_size
    per_rank_tp2 = roofline.resident_bytes_per_rank(chapter.cfg, 2, 4)
    monkeypatch.setenv(platform.DEVICE_MEMORY_ENV, str(int(per_rank_tp2 * 1.5)))
    assert chapter.model_for(2) == chapter.model_path
    assert chapter.model_for(1) == chapter.embedded_path
    note = capsys.readouterr().out
    assert note.count("\n") == 1 and note.startswith("Note: this cell runs on the embedded model, not ")
    assert "TP 1 in float32 needs" in note
    chapter.model_for(1)
    assert capsys.readouterr().out == ""                                  # one note per reason
    assert chapter.model_for(1, copies=2) == chapter.embedded_path
    ours = chapter.run("attention_tp", tp=1, n_new=4)
    assert ours["model_path"] == chapter.embedded_path
    assert ours["token_ids"] == chapter.run("hf_baseline", tp=1, n_new=4)["token_ids"]


def test_a_cell_that_fits_keeps_the_books_model(bigger_ckpt, monkeypatch, capsys):
    monkeypatch.setenv("QWEN3MOE_MODEL_PATH", bigger_ckpt)
    monkeypatch.setenv(platform.DEVICE_MEMORY_ENV, "20GB")
    chapter = book.Chapter("reference")
    out = capsys.readouterr().out
    assert "model: " in out and "20 GB" in out and bigger_ckpt not in out     # no machine paths printed
    ours, theirs, path = chapter.pair("reference")
    assert path == bigger_ckpt and capsys.readouterr().out == ""
    assert book.max_logit_diff(ours, theirs, chapter.prompt_ids(path), n_steps=3) < 1e-4


def test_dtype_follows_the_device(monkeypatch):
    assert book.Chapter(quiet=True).dtype == torch.float32
    monkeypatch.setattr(platform, "detect_device", lambda requested="auto": "cuda")
    monkeypatch.setattr(platform, "torch_device", lambda kind, i=0: torch.device("cpu"))
    assert book.Chapter(quiet=True).dtype == torch.bfloat16


def test_ladder_rows_and_table(capsys):
    chapter = book.Chapter("merged_qkv", quiet=True)
    rows = chapter.ladder(new_tokens=4)
    assert [r["step"] for r in rows] == ["hf_baseline", "reference", "attention_tp", "merged_qkv"]
    assert all(r["tokens_ok"] for r in rows) and rows[0]["ops_per_token"] > rows[-1]["ops_per_token"] > 0
    book.show_ladder(rows)


def test_ops_of_counts_a_call():
    x = torch.randn(4, 4)
    n, hist = book.ops_of(lambda t: (t @ t).relu(), x)
    assert n == 2 and set(hist) == {"aten::matmul", "aten::relu"}      # outermost operators, as the NPU dispatches them


@pytest.mark.parametrize("x, unit, text", [(2_172_000, "", "2.17 M"), (61.06e9, "B", "61.1 GB"), (999, "", "999"),
                                           (1500, "B", "1.5 kB"), (0.25, "", "0.25")])
def test_human(x, unit, text):
    assert book.human(x, unit) == text
