"""mtbkd: Multi-Teacher Bayesian Knowledge Distillation for PyTorch.

Fused multi-teacher losses (MT-BKD's teacher-informed mixture prior and the weighted-sum KD
family), Bayesian layers, SGLD and uncertainty metrics. The math is in ``docs/MATH.md``.
The pipeline's parts (``mtbkd.distill``, ``mtbkd.data``, ``mtbkd.report``, ``mtbkd.unirep``) and
``mtbkd.integrations`` are imported on first access (``mtbkd.distill.DistillConfig`` works after
``import mtbkd``), not by ``import mtbkd``.
"""

__version__ = "0.1.0"

from mtbkd import (  # noqa: E402
    distributed,
    functional,
    fused_linear,
    metrics,
    nn,
    ops,
    optim,
    posterior,
    reference,
    sparse,
)
from mtbkd.functional import (  # noqa: E402
    MTBKDStats,
    mtbkd_loss,
    multi_teacher_kd_loss,
    teacher_weights,
)
from mtbkd.fused_linear import FusedLinearMTBKDLoss, FusedLinearMultiTeacherKDLoss  # noqa: E402
from mtbkd.info import info  # noqa: E402
from mtbkd.losses import MTBKDLoss, MultiTeacherKDLoss  # noqa: E402
from mtbkd.nn import (  # noqa: E402
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesLinear,
    bayesify,
    kl_divergence,
    record_kl,
)
from mtbkd.optim import SGLD  # noqa: E402
from mtbkd.posterior import SampleStore, predict  # noqa: E402
from mtbkd.sparse import (  # noqa: E402
    SparseTeacher,
    load_sparse_teachers,
    save_sparse_teachers,
    topk_teacher,
)
from mtbkd.teacher_stats import TeacherStats  # noqa: E402

__all__ = [
    "__version__",
    "distributed",
    "functional",
    "fused_linear",
    "metrics",
    "nn",
    "ops",
    "optim",
    "posterior",
    "reference",
    "sparse",
    "info",
    "teacher_weights",
    "mtbkd_loss",
    "multi_teacher_kd_loss",
    "MTBKDStats",
    "MTBKDLoss",
    "MultiTeacherKDLoss",
    "FusedLinearMTBKDLoss",
    "FusedLinearMultiTeacherKDLoss",
    "SparseTeacher",
    "topk_teacher",
    "save_sparse_teachers",
    "load_sparse_teachers",
    "TeacherStats",
    "BayesLinear",
    "BayesConv1d",
    "BayesConv2d",
    "BayesConv3d",
    "bayesify",
    "kl_divergence",
    "record_kl",
    "SGLD",
    "SampleStore",
    "predict",
]

# imported on first access (PEP 562): they pull in matplotlib, scikit-learn, transformers ...
_LAZY_SUBMODULES = ("data", "distill", "integrations", "report", "unirep", "llm_demo", "cli")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"mtbkd.{name}")
    raise AttributeError(f"module 'mtbkd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_SUBMODULES})
