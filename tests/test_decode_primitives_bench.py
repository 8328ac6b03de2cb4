"""benchmarks/decode_primitives.py --pretend-cuda on this CPU: the CUDA decode path traced with
the package's CUDA checks answering yes, every kernel of a block one node."""

import json
import subprocess
import sys

from conftest import ROOT, repo_env


def _count(*args):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_primitives.py"), "--pretend-cuda", "--json",
                          "--embedding-dim", "64", "--num-heads", "2", *args], check=True, capture_output=True,
                         text=True, timeout=300, env=repo_env())
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pretend_cuda_counts_a_block_as_its_custom_kernels():
    bf16, q4 = _count(), _count("--q-bits", "4")
    for rec in (bf16, q4):
        assert rec["pretend_cuda"] is True
        # On the CUDA path a block is custom kernels only (a Depends node each): no CPU matmul or norm ops
        assert set(rec["per_block"]) == {"Depends"} and rec["kernels_per_block"] == rec["per_block"]["Depends"] >= 1
    assert q4["kernels_per_block"] < bf16["kernels_per_block"]  # 4 bits: the whole block merged into fewer launches
