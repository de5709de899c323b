"""The MT-BKD pipeline on your own model and teacher logits: MAP warm start, SGLD on the head,
posterior predictive, uncertainty metrics and which teacher each prediction followed.

Two teachers are each the exact Bayes posterior on one half of the classes and noise on the
other half; the student is any ``nn.Module`` with a ``head`` (the part SGLD samples).
Run: ``python examples/pipeline_own_model.py`` (a few seconds on two cores).
"""

import torch
from torch import nn

from mtbkd import distill

MEANS = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) * 1.2


def problem(n_per_class: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(4).repeat_interleave(n_per_class)
    x = MEANS[y] + torch.randn(len(y), 2, generator=g)
    logp = (-0.5 * ((x[:, None] - MEANS[None]) ** 2).sum(-1)).log_softmax(-1)
    noise = 3.0 * torch.randn(2, len(y), 4, generator=g)
    first = torch.where((y < 2)[:, None], logp, noise[0])
    second = torch.where((y >= 2)[:, None], logp, noise[1])
    return x, y, torch.stack([first, second])


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


x, y, teachers = problem(15, seed=0)
x_test, y_test, teachers_test = problem(500, seed=1)
config = distill.DistillConfig(
    batch_size=16, map_epochs=60, map_lr=1e-2, weight_decay=0.0, sgld_epochs=20,
    num_samples=50, concentration=20.0, prior_weight=0.5, sgld_lr=1e-3, progress=False,
)  # fmt: skip
for method in ("ce", "mtbkd_map", "mtbkd_sgld"):
    torch.manual_seed(0)
    result = distill.distill(Student(), teachers, x, y, config, method=method)
    m = result.evaluate(x_test, y_test)
    print(
        f"{method:<11} acc {m['accuracy']:.3f}  NLL {m['nll']:.3f}  ECE {m['ece']:.3f}  "
        f"95% set coverage {m['coverage']:.3f} (size {m['set_size']:.2f})  {result.seconds:.1f}s"
    )
weights, resp = distill.teacher_attribution(result.predict(x_test), teachers_test, result.objective)
for c in range(4):
    r = resp[:, y_test == c].mean(1)
    print(f"class {c}: responsibilities {[round(v, 2) for v in r.tolist()]}")
