"""The quantized state of the bundled models is bit for bit what it was when
tests/python/golden/quantized_state.json was made (with that script's --write, at fixed code
paths): a refactor may move code, never change what ``mpq.quantize`` computes. A deliberate
change to the results remakes the file in the same commit and says why."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "golden" / "quantized_state.py"


def test_quantized_state_is_bit_identical_to_the_golden_file():
    pytest.importorskip("transformers", reason="the MiniLM case needs transformers (the text extra)")
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert "bit-identical" in out.stdout, out.stdout
