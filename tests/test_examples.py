"""The example programs in examples/ run as documented (they must not rot)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(args: list[str], timeout: int = 300) -> str:
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, cwd=EXAMPLES.parent
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_quickstart():
    out = _run([sys.executable, str(EXAMPLES / "quickstart.py")])
    accs = [float(a) for a in re.findall(r"train acc ([0-9.]+)", out)]
    assert accs and accs[-1] > accs[0], out


def test_pipeline_own_model():
    out = _run([sys.executable, str(EXAMPLES / "pipeline_own_model.py")])
    # the example's two teachers are each right on half of the classes: the student must follow
    # the right one per class
    rows = re.findall(r"class (\d): responsibilities \[([0-9.]+), ([0-9.]+)\]", out)
    assert len(rows) == 4, out
    assert all(float(a) > 0.5 for c, a, b in rows if int(c) < 2)
    assert all(float(b) > 0.5 for c, a, b in rows if int(c) >= 2)


def test_compare_runs_refuses_an_unknown_reference(tmp_path):
    # a --reference that is none of the merged methods wrote a summary without the differences
    base, variant = (str(EXAMPLES.parent / "results" / d)
                     for d in ("deeploc-5seeds", "deeploc-5seeds-composition"))  # fmt: skip
    args = [sys.executable, str(EXAMPLES / "compare_runs.py"), base, variant, "--tag", "comp"]
    out = _run(args + ["--out", str(tmp_path / "ok")])
    assert "mtbkd_sgld_comp minus each method" in out
    proc = subprocess.run(args + ["--reference", "mtbkd_sgdl_comp", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert "--reference 'mtbkd_sgdl_comp' is none of the merged methods" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_torchrun_vocab_parallel():
    # `python -m torch.distributed.run` is what the `torchrun` script runs
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                str(EXAMPLES / "torchrun_vocab_parallel.py"), "--check"])  # fmt: skip
    m = re.search(r"check: vocab-parallel (\S+)\s+single-process (\S+)", out)
    assert m is not None, out
    assert abs(float(m.group(1)) - float(m.group(2))) <= 1e-4 * abs(float(m.group(2)))
