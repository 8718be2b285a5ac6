"""Benchmark suite: every op and the training step against openai/vdvae's eager ops and torch.compile of them.

Run `python -m benchmarks --suite ops|train|sample|all --out benchmarks/results`, or
`pytest benchmarks --benchmark-only` for pytest-benchmark's statistics of the op cases.
"""
