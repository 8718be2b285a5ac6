"""Benchmark suite: every op and the training step against openai/vdvae's eager ops and torch.compile of them.

Run `python -m benchmarks --suite ops|train|sample|all --out benchmarks/results` (`--help` lists the options),
`pytest benchmarks --benchmark-only` for pytest-benchmark's statistics of the op cases, and on a GPU machine
`bash benchmarks/run_gpu.sh`: parity tests (benchmarks.parity) and benchmarks in one call of at most 8 minutes.
"""
