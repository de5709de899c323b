"""Float32 entropy of nearly one-hot teachers, per backend, against a float64 truth.

A teacher whose top logit stands 8 to 40 above the others has an entropy of 1e-2 to 1e-15 (the
entropy weights of MATH.md section 1 divide such numbers by each other). Every backend forms it
from the online softmax as ``log S - sum e x / S``; ``log S`` is taken as ``log1p(S - 1)`` with
``S - 1`` summed apart (the sum without one entry at the maximum), since ``S = 1 + tiny`` rounds.
This prints, per backend that runs here, the largest relative error over every path that returns
an entropy (``teacher_weights``, ``TeacherStats``, ``mtbkd_loss`` at ``tau = tau_w``, ``2 tau_w``
and ``1.5 tau_w``), for the rows of :func:`one_hot_rows` at V = 9 and 3000 and K = 2:

    TRITON_INTERPRET=1 python bench/entropy_precision.py     # on CPU: C++ and Triton's interpreter
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def entropy_truth(t: torch.Tensor, tau_w: float) -> torch.Tensor:
    """Entropy of ``softmax(t / tau_w)`` in float64 with the top entry kept apart: ``log1p(R) +
    sum_{c != top} e_c (-u_c) / (1 + R)``, ``R`` the sum of the others (relative error ~1e-15)."""
    x = t.double() / tau_w
    u = x - x.amax(-1, keepdim=True)
    rest = u.exp().scatter(-1, u.argmax(-1, keepdim=True), 0.0)
    r = rest.sum(-1)
    return torch.log1p(r) + (rest * -u).sum(-1) / (1.0 + r)


def one_hot_rows(v: int) -> torch.Tensor:
    """Rows ``[6, v]`` with one logit 8, 16, 20, 30 or 40 above a gentle slope (the top early,
    late, and past the CPU kernels' first block of 1024 columns), and a tie at the top far apart."""
    rows = []
    for i, gap in enumerate((8.0, 16.0, 20.0, 30.0, 40.0)):
        r = torch.linspace(0.0, -0.5, v)
        r[(i * 977) % v] = gap
        rows.append(r)
    tie = torch.zeros(v)
    tie[[1, v - 2]] = 20.0
    rows.append(tie)
    return torch.stack(rows)


def worst_error(backend: str, device: str, tau_w: float = 1.0) -> float:
    """Largest relative entropy error of ``backend`` over the paths and rows above."""
    import mtbkd

    os.environ["MTBKD_BACKEND"] = backend
    try:
        worst = 0.0
        for v in (9, 3000):
            rows = one_hot_rows(v)
            t = torch.stack([rows, rows.roll(3, -1) * 0.9]).to(device)
            z = torch.randn(rows.shape[0], v, generator=torch.Generator().manual_seed(0))
            z = z.to(device)
            truth = entropy_truth(t.cpu(), tau_w)
            hs = [
                mtbkd.ops.teacher_weights_op([t[0], t[1]], 0, tau_w, True)[1],
                mtbkd.TeacherStats(t, weight_temperature=tau_w).data[..., 2],
            ]
            for tau in (tau_w, 2.0 * tau_w, 1.5 * tau_w):
                _, st = mtbkd.mtbkd_loss(z, t, temperature=tau, weight_temperature=tau_w,
                                         return_stats=True)  # fmt: skip
                hs.append(st.entropy)
            for h in hs:
                worst = max(worst, ((h.double().cpu() - truth) / truth).abs().max().item())
        return worst
    finally:
        os.environ.pop("MTBKD_BACKEND", None)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from mtbkd import ops

    argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="takes no options: it measures and prints"
    ).parse_args(argv)  # --help answers instead of measuring
    device = "cuda" if torch.cuda.is_available() else "cpu"
    status = ops.backend_status()
    print("| backend | device | max relative error of H_k (float32) |")
    print("|---|---|---|")
    for name in ("reference", "cpu", "triton", "cuda"):
        if status[name] is not None or (name == "cpu" and device == "cuda"):
            continue
        dev = "cpu" if name == "cpu" else device
        print(f"| {name} | {dev} | {worst_error(name, dev):.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
