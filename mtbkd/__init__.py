"""mtbkd: Multi-Teacher Bayesian Knowledge Distillation for PyTorch.

Fused multi-teacher losses (MT-BKD's teacher-informed mixture prior and the weighted-sum KD
family), Bayesian layers, SGLD and uncertainty metrics. The math is in ``design/MATH.md``.
"""

__version__ = "0.1.0"

from mtbkd import functional, ops, reference  # noqa: E402
from mtbkd.functional import MTBKDStats, mtbkd_loss, multi_teacher_kd_loss, teacher_weights  # noqa: E402
from mtbkd.info import info  # noqa: E402
from mtbkd.losses import MTBKDLoss, MultiTeacherKDLoss  # noqa: E402

__all__ = [
    "__version__",
    "functional",
    "ops",
    "reference",
    "info",
    "teacher_weights",
    "mtbkd_loss",
    "multi_teacher_kd_loss",
    "MTBKDStats",
    "MTBKDLoss",
    "MultiTeacherKDLoss",
]
