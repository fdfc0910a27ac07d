"""The CLI contract (README, "The main job") and its errors, against an independent HF `generate`."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from qwen3moe_tutorial import final
from qwen3moe_tutorial.hf import load_hf_model

CONTRACT_FIELDS = {"token_ids", "text", "prompt_token_ids", "prefill_ms", "decode_ms_per_token", "decode_ms",
                   "compile_s", "steps", "world_size", "device", "dtype", "env", "versions"}


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "qwen3moe_tutorial.final", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def test_cli_default_checkpoint_reference_equals_hf_baseline(tmp_path):
    env = {"QWEN3MOE_TUTORIAL_CACHE": str(tmp_path / "cache")}
    out = {}
    for step in ("hf_baseline", "reference"):
        p = run_cli("--upto", step, "--max-new-tokens", "12", "--json", str(tmp_path / f"{step}.json"), env=env)
        assert p.returncode == 0, p.stderr
        out[step] = json.load(open(tmp_path / f"{step}.json"))
        assert p.stdout.strip() == out[step]["text"].strip()
    ref = out["reference"]
    assert CONTRACT_FIELDS <= set(ref)
    assert ref["token_ids"] == out["hf_baseline"]["token_ids"] and len(ref["token_ids"]) == 12
    assert ref["steps"] == ["hf_baseline", "reference"] and out["hf_baseline"]["steps"] == ["hf_baseline"]
    assert ref["bytes_read_per_rank"][0] > 0 and ref["launcher"] == "single"
    assert ref["world_size"] == 1 and ref["device"] == "cpu" and ref["dtype"] == "float32"
    assert len(ref["decode_ms"]) == 11 and ref["decode_ms_per_token"] > 0 and ref["versions"]["torch"]


def test_final_matches_independent_hf_generate(tmp_path, other_ckpt, capsys):
    assert final.main(["--model-path", other_ckpt, "--upto", "reference", "--max-new-tokens", "20",
                       "--prompt", "Tensor parallelism splits every matrix", "--json", str(tmp_path / "r.json")]) == 0
    ours = json.load(open(tmp_path / "r.json"))
    model = load_hf_model(other_ckpt)
    ids = torch.tensor([ours["prompt_token_ids"]])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    assert ours["token_ids"] == ref[0, ids.shape[1]:].tolist()


def one_line_error(capsys, argv, *words):
    code = final.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


def test_bad_inputs_give_one_line_errors(tmp_path, tiny_ckpt, capsys):
    one_line_error(capsys, ["--model-path", str(tmp_path / "missing")], "does not exist")
    corrupt = shutil.copytree(tiny_ckpt, tmp_path / "corrupt")
    with open(corrupt / "model-00002-of-00003.safetensors", "r+b") as f:
        f.write(b"\x00" * 8)
    one_line_error(capsys, ["--model-path", str(corrupt)], "corrupt")
    mismatch = shutil.copytree(tiny_ckpt, tmp_path / "mismatch")
    cfg = json.load(open(mismatch / "config.json"))
    json.dump({**cfg, "hidden_size": 64}, open(mismatch / "config.json", "w"))
    one_line_error(capsys, ["--model-path", str(mismatch)], "does not match the weights")
    one_line_error(capsys, ["--model-path", tiny_ckpt, "--max-seq-len", "16", "--max-new-tokens", "10"],
                   "exceeds the KV-cache capacity")
    one_line_error(capsys, ["--model-path", tiny_ckpt, "--prompt-ids", "1,2,x"], "comma-separated integers")
    one_line_error(capsys, ["--model-path", tiny_ckpt, "--prompt-ids", "1,5000"], "[0, 1024)")
    one_line_error(capsys, ["--model-path", tiny_ckpt, "--tp", "2", "--upto", "reference"],
                   "starts at the attention_tp step")
    one_line_error(capsys, ["--model-path", tiny_ckpt, "--tp", "3"], "num_attention_heads (8) is not divisible")
    one_line_error(capsys, ["--model-path", tiny_ckpt, "--max-seq-len", "2048"], "max_position_embeddings")
    notok = shutil.copytree(tiny_ckpt, tmp_path / "notok")
    os.remove(notok / "tokenizer.json"), os.remove(notok / "tokenizer_config.json")
    one_line_error(capsys, ["--model-path", str(notok)], "--prompt-ids")
    assert final.main(["--model-path", str(notok), "--prompt-ids", "3,4,5", "--max-new-tokens", "3"]) == 0


@pytest.mark.parametrize("argv, words", [
    (["--upto", "warp_drive"], "invalid choice: 'warp_drive'"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--dtype", "float16"], "invalid choice: 'float16'"),
    (["--compile-cache", "/tmp/x", "--upto", "graph_mode"], "--compile-cache needs the compile_cache step"),
])
def test_bad_arguments_print_usage(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        final.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage:") and words in err


def test_cli_bad_input_exits_cleanly(tmp_path):
    p = run_cli("--model-path", str(tmp_path / "missing"))
    assert p.returncode == 2 and "Traceback" not in p.stderr and "does not exist" in p.stderr


def _live_session_members(sid: int) -> list[int]:
    """Processes (not zombies) in session `sid`, read from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()      # state, ppid, pgrp, session, ...
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            pids.append(int(entry))
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc") or not hasattr(os, "killpg"), reason="needs Linux /proc")
@pytest.mark.parametrize("target, wait_s", [("group", 3), ("launcher", 3), ("group", 0)])
def test_ctrl_c_leaves_no_worker_processes(target, wait_s):
    """Ctrl-C in a terminal sends SIGINT to the whole foreground group; `kill -INT` only to the launcher.
    Either way the job ends with exit 130, one line, and no process of it survives — also when the
    ranks are still starting (importing torch) as it arrives."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "qwen3moe_tutorial.final", "--tp", "2", "--upto", "fused_attention",
                             "--max-new-tokens", "900", "--max-seq-len", "1000", "--ignore-eos"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(_live_session_members(proc.pid)) < 3:           # the launcher and its two ranks
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.2)
        time.sleep(wait_s)                                         # let them load and start generating
        if target == "group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
        deadline = time.monotonic() + 15
        while _live_session_members(proc.pid):
            assert time.monotonic() < deadline, f"left running: {_live_session_members(proc.pid)}"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_dtype_defaults_to_the_device(capsys, monkeypatch):
    assert final.default_dtype("cpu") == "float32"
    assert final.default_dtype("npu") == final.default_dtype("cuda") == "bfloat16"
    monkeypatch.setattr(final.platform, "npu_available", lambda: False)
    one_line_error(capsys, ["--device", "npu"], "--device npu was requested")      # not a traceback


def test_npu_launch_env_goes_in_before_torch_npu_and_is_taken_back_without_an_npu(monkeypatch):
    """platform.torch_npu_module is the package's one import of torch_npu: the launcher's NPU settings
    are in the environment when it starts (they are read then), and taken back when no NPU turns up,
    so a CPU run's result does not claim them. A stand-in torch_npu records what it saw."""
    import importlib.abc
    import importlib.machinery

    for name in final.platform.NPU_LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    seen = {}

    class Loader(importlib.abc.Loader):
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            seen.update(os.environ)

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            return importlib.machinery.ModuleSpec(name, Loader()) if name == "torch_npu" else None

    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    final.platform.torch_npu_module.cache_clear()
    try:
        assert final.resolve_device("auto") == "cpu"          # the stand-in registers no torch.npu
    finally:
        final.platform.torch_npu_module.cache_clear()
        sys.modules.pop("torch_npu", None)
    assert seen["HCCL_CONNECT_TIMEOUT"] == "1200" and seen["TASK_QUEUE_ENABLE"] == "2"   # set before the import
    assert not set(final.platform.NPU_LAUNCH_ENV) & set(os.environ)


def test_max_seq_len_default_fits_a_short_context_model(tmp_path, tiny_ckpt, capsys):
    short = shutil.copytree(tiny_ckpt, tmp_path / "short")
    cfg = json.load(open(short / "config.json"))
    json.dump({**cfg, "max_position_embeddings": 256}, open(short / "config.json", "w"))
    out = tmp_path / "r.json"
    assert final.main(["--model-path", str(short), "--upto", "reference", "--tp", "1", "--max-new-tokens", "4",
                       "--json", str(out)]) == 0                               # no --max-seq-len: fits 256
    assert json.load(open(out))["max_seq_len"] == 256
    capsys.readouterr()
    one_line_error(capsys, ["--model-path", str(short), "--upto", "reference", "--max-new-tokens", "300"],
                   "max_position_embeddings (256)")
    one_line_error(capsys, ["--model-path", str(short), "--max-seq-len", "512"], "max_position_embeddings (256)")
    long = tmp_path / "long.json"                                              # more than the default 512
    assert final.main(["--model-path", tiny_ckpt, "--upto", "reference", "--tp", "1", "--max-new-tokens", "600",
                       "--ignore-eos", "--prompt-ids", "1,2", "--json", str(long)]) == 0
    assert json.load(open(long))["max_seq_len"] == 602
