"""llama.cpp as a peer on the same checkpoint: an optional set-up, not part of CI.

    python scripts/llama_cpp_peer.py build                 # download llama-cpp-python's sdist, build llama-bench
    python scripts/llama_cpp_peer.py convert CKPT OUT.gguf # Hugging Face -> GGUF at f32, llama.cpp's own converter
    python scripts/llama_cpp_peer.py bench OUT.gguf --threads 2 --tokens 48

`build` takes about 10 minutes on 2 cores. It uses the llama.cpp that the llama-cpp-python sdist
vendors (PyPI is reachable where model hubs are not), configured for this CPU (GGML_NATIVE) and
recorded in `<dir>/build_info.json`. `convert` runs the vendored `convert_hf_to_gguf.py`; that
converter recognises a BPE pre-tokenizer by hashing what it makes of a fixed text, and our
generated tokenizer is new to it, so it is told which one it is: Qwen2's (the same split regex,
`qwen3moe_tutorial.weights.make_tokenizer`). `bench` runs `llama-bench -p 0 -n TOKENS` (decode
only, no prompt) and reports ms per token = 1000 / tokens per second. scripts/benchmark.py
--llama-cpp uses all three.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tarfile

from qwen3moe_tutorial.weights import cache_root

PACKAGE = "llama-cpp-python"
PRE_TOKENIZER = "qwen2"          # what llama.cpp calls the split regex our tokenizer uses
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_HTML=OFF",
               "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF")


def default_dir() -> str:
    return os.path.join(cache_root(), "llama.cpp")


def source_dir(root: str) -> str:
    found = sorted(glob.glob(os.path.join(root, "llama_cpp_python-*", "vendor", "llama.cpp")))
    if not found:
        raise SystemExit(f"error: no llama.cpp source under {root}; run `python scripts/llama_cpp_peer.py build` first")
    return found[-1]


def bench_binary(root: str) -> str:
    path = os.path.join(source_dir(root), "build", "bin", "llama-bench")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} is missing; run `python scripts/llama_cpp_peer.py build` first")
    return path


def build(root: str, version: str | None = None) -> dict:
    """Download the sdist (one version, no dependencies), unpack it, build llama-bench."""
    os.makedirs(root, exist_ok=True)
    spec = f"{PACKAGE}=={version}" if version else PACKAGE
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec, "-d", root],
                   check=True)
    sdist = sorted(glob.glob(os.path.join(root, "llama_cpp_python-*.tar.gz")))[-1]
    with tarfile.open(sdist) as tar:
        tar.extractall(root, filter="data")
    src = source_dir(root)
    subprocess.run(["cmake", "-B", "build", "-G", "Ninja", *CMAKE_FLAGS], cwd=src, check=True)
    subprocess.run(["cmake", "--build", "build", "--target", "llama-bench", f"-j{os.cpu_count() or 1}"], cwd=src,
                   check=True)
    info = {"sdist": os.path.basename(sdist), "cmake_flags": list(CMAKE_FLAGS), "source": os.path.relpath(src, root)}
    with open(os.path.join(root, "build_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def convert(root: str, checkpoint: str, out: str, outtype: str = "f32") -> str:
    """checkpoint -> GGUF with the vendored converter, told our tokenizer's pre-tokenizer."""
    src = source_dir(root)
    bootstrap = (
        "import runpy, sys\n"
        f"sys.path[:0] = [{src!r}, {os.path.join(src, 'gguf-py')!r}]\n"
        "from conversion import base\n"
        f"base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {PRE_TOKENIZER!r}\n"
        f"sys.argv = ['convert_hf_to_gguf.py', {checkpoint!r}, '--outtype', {outtype!r}, '--outfile', {out!r}]\n"
        f"runpy.run_path({os.path.join(src, 'convert_hf_to_gguf.py')!r}, run_name='__main__')\n")
    subprocess.run([sys.executable, "-c", bootstrap], check=True, capture_output=True, text=True)
    return out


def bench(root: str, gguf: str, threads: int, tokens: int, repeats: int = 1) -> dict:
    """llama-bench's decode test (no prompt, `tokens` generated, `repeats` times): ms per token and
    the build that measured it."""
    cmd = [bench_binary(root), "-m", gguf, "-p", "0", "-n", str(tokens), "-t", str(threads), "-r", str(repeats),
           "-o", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"llama-bench failed ({p.returncode}): {p.stderr[-2000:]}")
    row = json.loads(p.stdout)[0]
    samples = [ns / 1e6 / tokens for ns in row["samples_ns"]]             # ms per token of each repetition
    return {"decode_ms_per_token": 1e3 / row["avg_ts"], "samples_ms_per_token": samples,
            "threads": row["n_threads"], "tokens": tokens, "build_commit": row["build_commit"],
            "build_number": row["build_number"], "cpu_info": row["cpu_info"], "model_type": row["model_type"],
            "command": " ".join(os.path.basename(c) if c in (cmd[0], gguf) else c for c in cmd)}   # no machine paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default=default_dir(), help="where llama.cpp is downloaded and built (default: %(default)s)")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--version", help=f"{PACKAGE} version (default: the newest)")
    c = sub.add_parser("convert")
    c.add_argument("checkpoint")
    c.add_argument("out")
    r = sub.add_parser("bench")
    r.add_argument("gguf")
    r.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    r.add_argument("--tokens", type=int, default=48)
    r.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.cmd == "build":
        print(json.dumps(build(args.dir, args.version), indent=1))
    elif args.cmd == "convert":
        print(convert(args.dir, args.checkpoint, args.out))
    else:
        print(json.dumps(bench(args.dir, args.gguf, args.threads, args.tokens, args.repeats), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
