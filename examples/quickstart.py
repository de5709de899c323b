"""Quick start: distil a student from three teachers with the fused MT-BKD loss.

A linear student on synthetic 20-class data; three teachers, each an expert on different classes.
Prints the loss and the mean teacher weights / responsibilities every few steps.
Run: ``python examples/quickstart.py``.
"""

import torch

import mtbkd

torch.manual_seed(0)
n, d, v, k = 512, 32, 20, 3
x = torch.randn(n, d)
true_w = torch.randn(d, v)
logits_true = x @ true_w
labels = logits_true.argmax(-1)
# Teacher k is sharp on its own third of the classes and blurred elsewhere.
teachers = []
for j in range(k):
    own = torch.zeros(v, dtype=torch.bool)
    own[j * v // k : (j + 1) * v // k] = True
    noise = torch.randn(n, v) * torch.where(own, 0.3, 3.0)
    teachers.append(logits_true * torch.where(own, 1.0, 0.2) + noise)
teacher_logits = torch.stack(teachers)

student = torch.nn.Linear(d, v)
opt = torch.optim.Adam(student.parameters(), lr=3e-2)
loss_fn = mtbkd.MTBKDLoss(temperature=2.0, concentration=5.0, prior_weight=0.05)
for step in range(41):
    loss, stats = loss_fn(student(x), teacher_logits, labels, return_stats=True)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0:
        acc = (student(x).argmax(-1) == labels).float().mean()
        print(
            f"step {step:3d}  loss {loss.item():.4f}  train acc {acc:.3f}  "
            f"mean weights {[round(w, 3) for w in stats.weights.mean(1).tolist()]}  "
            f"mean responsibilities "
            f"{[round(r, 3) for r in stats.responsibilities.mean(1).tolist()]}"
        )
print("backend:", mtbkd.ops.select_backend(torch.device("cpu"), "mtbkd_loss_fwd"))
