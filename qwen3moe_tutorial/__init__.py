"""qwen3moe_tutorial: low-latency batch-1 decode of Qwen3-MoE, one optimization per chapter.

Start with `python -m qwen3moe_tutorial.final --help`, or read the book (README.md).
"""
__version__ = "0.1.0"
