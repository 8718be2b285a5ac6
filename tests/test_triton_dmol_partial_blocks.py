"""The Triton dmol_nll kernels of images whose pixels do not fill whole blocks, compiled for sm_90.

Their loads and stores are masked (an image of H W pixels, H W not a multiple of the block, has a last block
that is partly empty); tests/test_triton_compile.py compiles the training shapes, whose blocks are whole and
unmasked. No GPU is needed: benchmarks/triton_sass.py's compile-only driver, in a subprocess as there.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from benchmarks import triton_sass

ROOT = Path(__file__).resolve().parents[1]

_COMPILE = """
import json
from benchmarks import triton_sass
triton_sass._install_compile_only_sm90()
import torch
from vdvae_fast import ops
rows = []
for dtype, fmt in [(torch.float32, torch.contiguous_format), (torch.bfloat16, torch.channels_last)]:
    triton_sass._LAUNCHES.clear()
    logits = torch.zeros(2, 100, 33, 17, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(True)
    x = torch.zeros(2, 3, 33, 17).contiguous(memory_format=fmt)
    ops.dmol_nll(logits, x, num_bits=8, backend="triton").sum().backward()
    kernels = [triton_sass.describe(name, kernel, kwargs) for name, kernel, kwargs in triton_sass._LAUNCHES]
    rows.append({"label": f"{dtype} 33x17", "error": "", "kernels": kernels})
print(json.dumps(rows))
"""


def test_masked_kernels_compile_for_sm90_within_registers() -> None:
    missing = triton_sass.ptxas_missing()
    if missing is not None:
        pytest.skip(f"cannot compile Triton for sm_90: {missing}")
    for row in triton_sass.run_compile_script(textwrap.dedent(_COMPILE), str(ROOT)):
        kernels = {k["kernel"]: k for k in row["kernels"]}
        assert set(kernels) == {"_dmol_nll_forward_kernel", "_dmol_nll_backward_kernel"}, row
        assert all(not k["constexprs"]["WHOLE_BLOCKS"] for k in kernels.values()), row
        assert triton_sass.problems(row) == [], row
        assert all("per_item" in k for k in kernels.values()), row  # the loops over the mixtures were found
