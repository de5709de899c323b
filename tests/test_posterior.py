"""SampleStore (burn-in, thinning, max_samples, safetensors) and the batched predictive."""

import numpy as np
import pytest
import torch
from torch import nn

from mtbkd import posterior
from mtbkd.posterior import SampleStore, predict


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def test_burn_in_thinning_and_max_samples():
    model = _model()
    store = SampleStore(model, include="2.*", burn_in=3, thin=2, max_samples=4)
    assert store.names == ["2.weight", "2.bias"]
    assert store.numel == 16 * 3 + 3
    stored = []
    for step in range(1, 21):
        with torch.no_grad():
            model[2].weight.fill_(step)
            model[2].bias.fill_(-step)
        if store.collect():
            stored.append(step)
    # Calls 4, 6, 8, ... are kept after a burn-in of 3 and thinning 2; the buffer holds 4.
    assert stored == [4, 6, 8, 10]
    assert len(store) == 4 and store.kept == 9 and store.calls == 20
    s = store.stacked()
    assert s["2.weight"].shape == (4, 3, 16) and s["2.bias"].shape == (4, 3)
    assert s["2.weight"][:, 0, 0].tolist() == [4.0, 6.0, 8.0, 10.0]
    assert s["2.bias"][:, 1].tolist() == [-4.0, -6.0, -8.0, -10.0]
    assert torch.equal(store.sample(-1)["2.weight"], torch.full((3, 16), 10.0))
    # Views of the one preallocated buffer, no copies.
    assert s["2.weight"].data_ptr() == store.buffer.data_ptr()


def test_reservoir_keeps_a_uniform_subset():
    p = torch.zeros(1)
    hits = torch.zeros(40)
    for rep in range(300):
        torch.manual_seed(rep)
        store = SampleStore({"p": p}, max_samples=10, reservoir=True)
        for step in range(40):
            p.fill_(step)
            store.collect()
        assert len(store) == 10
        hits[store.samples().long().flatten()] += 1
    # Every step is kept with probability 10/40: 75 expected hits each, sd ~7.5.
    assert (hits - 75).abs().max() < 35


def test_bf16_buffer_and_device_argument():
    model = _model()
    store = SampleStore(model, dtype=torch.bfloat16, device="cpu", max_samples=3)
    store.collect()
    assert store.buffer.dtype == torch.bfloat16
    w = store.stacked(dtype=torch.float32)["0.weight"][0]
    torch.testing.assert_close(w, model[0].weight.detach(), atol=1e-2, rtol=1e-2)


def test_save_load_round_trip(tmp_path):
    model = _model()
    store = SampleStore(model, include=["2.weight", "2.bias"], burn_in=1, thin=1, max_samples=5,
                        dtype=torch.bfloat16)  # fmt: skip
    for _ in range(4):
        with torch.no_grad():
            model[2].weight.add_(torch.randn_like(model[2].weight))
        store.collect()
    path = tmp_path / "samples.safetensors"
    store.save(path)
    loaded = SampleStore.load(path, model)
    assert loaded.names == store.names and loaded.shapes == store.shapes
    assert len(loaded) == len(store) == 3
    assert loaded.buffer.dtype == torch.bfloat16
    assert torch.equal(loaded.samples(), store.samples())
    assert (loaded.burn_in, loaded.thin, loaded.max_samples) == (1, 1, 5)
    # It keeps collecting into the remaining rows.
    assert loaded.collect() and len(loaded) == 4
    # Plain safetensors (no pickle): readable by the safetensors API alone.
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(path))["samples"], store.samples())
    # readable as any file this process writes (safetensors itself makes it 0600: another user
    # of a shared machine could not apply a run's posterior)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    # Without a module it only serves predict.
    bare = SampleStore.load(path)
    with pytest.raises(RuntimeError, match="cannot collect"):
        bare.collect()


def test_load_checks_the_module(tmp_path):
    store = SampleStore(_model(), include="2.*", max_samples=2)
    store.collect()
    path = tmp_path / "s.safetensors"
    store.save(path)
    other = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="2.weight"):
        SampleStore.load(path, other)
    with pytest.raises(ValueError, match="no parameter"):
        SampleStore.load(path, nn.Linear(2, 2))
    # a state_dict with non-float entries (batch norm's counter) is a fine mapping
    bn = nn.Sequential(*_model(), nn.BatchNorm1d(3))
    loaded = SampleStore.load(path, bn.state_dict())
    assert loaded.names == store.names and torch.equal(loaded.samples(), store.samples())
    with pytest.raises(ValueError, match="no parameter"):
        SampleStore.load(path, {"other": torch.zeros(1)})
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"samples": torch.zeros(1, 2)}, str(bad))
    with pytest.raises(ValueError, match="not a SampleStore"):
        SampleStore.load(bad)


@pytest.mark.parametrize("chunk", [1, 3, 100, None, "auto3"])
def test_predict_matches_a_loop_over_samples(chunk, monkeypatch):
    model = _model().eval()
    store = SampleStore(model, include="2.*", max_samples=7)
    if chunk == "auto3":  # automatic chunks of 3, 3 and 1 samples
        head_bytes = 4 * (model[2].weight.numel() + model[2].bias.numel())
        monkeypatch.setattr(posterior, "PREDICT_PARAM_BYTES", 3 * head_bytes + 1)
        monkeypatch.setattr(posterior, "PREDICT_MIN_CHUNK", 2)
        chunk = None
    samples = []
    for _ in range(7):
        with torch.no_grad():
            model[2].weight.copy_(torch.randn_like(model[2].weight))
            model[2].bias.copy_(torch.randn_like(model[2].bias))
        samples.append({k: v.clone() for k, v in model.state_dict().items()})
        store.collect()
    x = torch.randn(11, 5)
    probs = predict(model, store, x, chunk=chunk)
    assert probs.shape == (7, 11, 3) and probs.dtype == torch.float32
    for s, sd in enumerate(samples):
        model.load_state_dict(sd)
        with torch.no_grad():
            expected = torch.softmax(model(x), -1)
        torch.testing.assert_close(probs[s], expected, atol=1e-6, rtol=1e-6)
    logits = predict(model, store, x, chunk=chunk, probabilities=False)
    torch.testing.assert_close(torch.softmax(logits, -1), probs)


def test_predict_errors():
    model = _model()
    store = SampleStore(model, include="2.*", max_samples=2)
    with pytest.raises(ValueError, match="no samples"):
        predict(model, store, torch.randn(2, 5))
    store.collect()
    with pytest.raises(ValueError, match="no parameters named"):
        predict(nn.Linear(5, 3), store, torch.randn(2, 5))
    wider = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    with pytest.raises(ValueError, match="'2.weight' has shape \\(3, 7\\)"):
        predict(wider, store, torch.randn(2, 5))
    with pytest.raises(ValueError, match="chunk"):
        predict(model, store, torch.randn(2, 5), chunk=0)
    with pytest.raises(TypeError, match="probabilities must be True or False"):
        predict(model, store, torch.randn(2, 5), probabilities="no")  # returned probabilities


def test_automatic_chunk_sizes(monkeypatch):
    model = nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 10))
    head = SampleStore(model, include="2.*", max_samples=400)
    full = SampleStore(model, max_samples=400)
    for store in (head, full):
        for _ in range(400):
            store.collect()
    params = dict(model.named_parameters())
    out = torch.empty(400, 1000, 10)
    # the head (510 floats) fits 4,112 times in 8 MiB: one chunk for all 400 samples; the whole
    # network (5,560 floats) 377 times
    assert posterior._auto_chunk(head, params, out) == 400
    assert posterior._auto_chunk(full, params, out) == 8 * 2**20 // (4 * 5560)
    # outputs bound the chunk too: [N, C] = 100,000 x 10 floats is 4 MB a sample
    assert posterior._auto_chunk(head, params, torch.empty(2, 100_000, 10)) == 67
    # fewer than PREDICT_MIN_CHUNK (8) samples a chunk: one call per sample
    assert posterior._auto_chunk(head, params, torch.empty(2, 1_000_000, 10)) == 1
    monkeypatch.setattr(posterior, "PREDICT_PARAM_BYTES", 8 * 4 * 5560)
    assert posterior._auto_chunk(full, params, out) == 8
    monkeypatch.setattr(posterior, "PREDICT_PARAM_BYTES", 8 * 4 * 5560 - 1)
    assert posterior._auto_chunk(full, params, out) == 1


def test_bad_store_arguments():
    model = _model()
    with pytest.raises(ValueError, match="thin"):
        SampleStore(model, thin=0)
    with pytest.raises(ValueError, match="burn_in"):
        SampleStore(model, burn_in=-1)
    with pytest.raises(ValueError, match="max_samples"):
        SampleStore(model, max_samples=0)
    with pytest.raises(TypeError, match="dtype"):
        SampleStore(model, dtype=torch.float16)
    with pytest.raises(ValueError, match="no parameters selected"):
        SampleStore(model, include="head.*")
    with pytest.raises(TypeError, match="module_or_params"):
        SampleStore([torch.zeros(2)])
    with pytest.raises(TypeError, match="reservoir must be True or False"):  # "no" was True
        SampleStore(model, reservoir="no")


def test_load_a_store_with_buffers_into_its_module(tmp_path):
    # a store of a state_dict (batch norm statistics included) loaded with its module: before,
    # "module has no parameter '1.running_mean'", though predict(module, ...) takes it
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    state = {k: v for k, v in net.state_dict().items() if v.is_floating_point()}
    store = SampleStore(state, max_samples=2)
    store.collect()
    store.save(tmp_path / "s.safetensors")
    back = SampleStore.load(tmp_path / "s.safetensors", net)
    assert back.names == store.names and len(back) == 1
    net.eval()
    x = torch.randn(4, 3)
    torch.testing.assert_close(predict(net, back, x), predict(net, store, x))


def test_automatic_chunks_run_the_unsampled_body_once():
    class Rows(nn.Module):  # records the rows of every input the body sees
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x):
            self.seen.append(x.shape[0])
            return x

    rows = Rows()
    model = nn.Sequential(rows, nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    store = SampleStore(model, include="3.*", max_samples=9)
    for _ in range(9):
        with torch.no_grad():
            model[3].weight.add_(torch.randn_like(model[3].weight))
        store.collect()
    predict(model, store, torch.randn(11, 5))
    assert rows.seen == [1, 11]  # a one-row probe of the output's size, then all 9 samples at once


def test_predict_with_sampled_buffers():
    # a store made from a state_dict holds batch norm's running statistics too: predict refused
    # it ("model has no parameters named ['1.running_mean', ...]")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))
    floats = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    store = SampleStore(floats, include=["1.*", "2.*"], max_samples=3)
    for _ in range(3):
        model.train()
        model(torch.randn(32, 5))
        with torch.no_grad():
            model[2].weight.add_(torch.randn_like(model[2].weight))
        store.collect()
    assert "1.running_mean" in store.names
    model.eval()
    x = torch.randn(4, 5)
    got = [predict(model, store, x, chunk=c) for c in (None, 1)]
    for s in range(3):
        model.load_state_dict(store.sample(s), strict=False)
        with torch.no_grad():
            expected = torch.softmax(model(x), -1)
        for probs in got:
            torch.testing.assert_close(probs[s], expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk", [None, 3])
def test_predict_in_training_mode(chunk):
    # chunk=None probed with one row: a training-mode batch norm raised "Expected more than 1
    # value per channel"; vmapped dropout raised vmap's randomness error (chunk=1 ran)
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)).train()
    store = SampleStore(bn, include="2.*", max_samples=6)
    for _ in range(6):
        with torch.no_grad():
            bn[2].weight.add_(torch.randn_like(bn[2].weight))
        store.collect()
    x = torch.randn(4, 5)
    probs = predict(bn, store, x, chunk=chunk)
    assert bn.training and bn[1].training
    torch.testing.assert_close(probs, predict(bn, store, x, chunk=1))
    drop = nn.Sequential(nn.Linear(5, 64), nn.Dropout(0.5), nn.Linear(64, 3)).train()
    store = SampleStore(drop, include="2.*", max_samples=6)
    for _ in range(6):  # six copies of one sample: only the dropout masks differ
        store.collect()
    probs = predict(drop, store, x, chunk=chunk)
    assert probs.shape == (6, 4, 3) and torch.isfinite(probs).all()
    assert not torch.allclose(probs[0], probs[1])  # a mask per sample
    drop.eval()
    probs = predict(drop, store, x, chunk=chunk)
    torch.testing.assert_close(probs[0], probs[5])


def test_predict_model_must_return_a_tensor():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(x), x

    model = Pair()
    store = SampleStore(model, max_samples=2)
    store.collect()
    for chunk in (None, 1):
        with pytest.raises(TypeError, match="model must return a tensor"):
            predict(model, store, torch.randn(4, 5), chunk=chunk)
    # one logit per row ([N], e.g. Linear(5, 1) then squeeze): before, a softmax over the rows
    squeezed = nn.Sequential(nn.Linear(5, 1), nn.Flatten(0))
    store = SampleStore(squeezed, max_samples=2)
    store.collect()
    store.collect()
    for chunk in (None, 1, 2):
        with pytest.raises(ValueError, match=r"logits \[N, C\] .* got shape \(\d+,\)"):
            predict(squeezed, store, torch.randn(4, 5), chunk=chunk)


@pytest.mark.parametrize("chunk", [None, 3])
def test_predict_with_a_sampling_bayes_linear(chunk):
    # a bayesify'd model (BayesLinear sampling its weights in the forward) raised vmap's
    # "calling .item() on a Tensor" error: its seed is drawn on the host
    from mtbkd import bayesify

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    model = bayesify(net, include=["2"])
    store = SampleStore(model, max_samples=5)
    for _ in range(5):
        with torch.no_grad():
            model[2].weight_mu.add_(torch.randn_like(model[2].weight_mu))
        store.collect()
    x = torch.randn(4, 3)
    probs = predict(model, store, x, chunk=chunk)
    assert probs.shape == (5, 4, 2) and torch.isfinite(probs).all()
    model[2].freeze()  # the posterior mean: deterministic, vmapped, equal to one call per sample
    torch.testing.assert_close(
        predict(model, store, x, chunk=chunk), predict(model, store, x, chunk=1)
    )


def test_reservoir_keeps_each_offered_sample_with_equal_probability():
    # Reservoir sampling with one slot: after 4 offers each is the stored one with probability
    # 1/4 (the i-th offer replaces the slot with probability 1/i)
    p = torch.zeros(1)
    hits = torch.zeros(4)
    torch.manual_seed(0)
    for _ in range(1200):
        store = SampleStore({"p": p}, max_samples=1, reservoir=True)
        for step in range(4):
            p.fill_(step)
            store.collect()
        hits[int(store.samples()[0, 0])] += 1
    # 300 expected hits each, sd = sqrt(1200 * 1/4 * 3/4) = 15
    assert (hits - 300).abs().max() < 75, hits


def test_predict_takes_one_tensor():
    model = _model()
    store = SampleStore(model, include="2.*")
    store.collect()
    with pytest.raises(TypeError, match="inputs must be one torch.Tensor .* got tuple"):
        predict(model, store, (torch.randn(4, 5),))


def test_collect_follows_replaced_parameters(tmp_path):
    # found by a review: the store kept the tensors it was made with, so after
    # load_state_dict(assign=True) every later sample was the stale, unchanging old value
    model = _model()
    store = SampleStore(model, include="2.*")
    store.collect()
    new = {k: torch.full_like(v, 7.0) for k, v in model.state_dict().items()}
    model.load_state_dict(new, assign=True)
    store.collect()
    assert torch.equal(store.sample(1)["2.bias"], torch.full((3,), 7.0))
    # a store loaded with the module follows it too
    store.save(tmp_path / "s.safetensors")
    loaded = SampleStore.load(tmp_path / "s.safetensors", model)
    model.load_state_dict({k: v + 1 for k, v in new.items()}, assign=True)
    loaded.collect()
    assert torch.equal(loaded.sample(-1)["2.bias"], torch.full((3,), 8.0))
    model[2] = nn.Linear(16, 4)
    with pytest.raises(RuntimeError, match=r"parameter '2.weight' of the module now has shape"):
        store.collect()
    del model[2]
    with pytest.raises(RuntimeError, match="no longer has parameter '2.weight'"):
        store.collect()


class _Tied(nn.Module):
    """A language model's shape: the output head shares the embedding's weight."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.norm(self.emb(x)))


@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_stores_of_a_weight_tied_model_predict_and_load(chunk, tmp_path):
    # an audit (thirtieth session): the documented state_dict recipe, and include="head.*",
    # failed on a tied model (named_parameters() drops the second name of a tied tensor)
    torch.manual_seed(0)
    m = _Tied().eval()
    store = SampleStore({k: v for k, v in m.state_dict().items() if v.is_floating_point()},
                        max_samples=2)  # fmt: skip
    head = SampleStore(m, include="head.*", max_samples=2)
    assert head.names == ["head.weight"]
    for _ in range(2):
        store.collect()
        head.collect()
        with torch.no_grad():
            m.emb.weight.mul_(2.0)
    x = torch.randint(0, 6, (5,))
    with torch.no_grad():
        m.emb.weight.div_(2.0)  # back to the second sample
        want = torch.softmax(m(x), -1)
    for s in (store, head):
        probs = predict(m, s, x, chunk=chunk)
        torch.testing.assert_close(probs[1], want)
        s.save(tmp_path / "s.safetensors")
        back = SampleStore.load(tmp_path / "s.safetensors", m)
        torch.testing.assert_close(predict(m, back, x, chunk=chunk), probs)


@pytest.mark.parametrize("chunk", [1, 2, None])
def test_training_mode_predict_leaves_the_stored_running_statistics_alone(chunk):
    # an audit: one plain call per sample ran batch norm on views of the store's buffer, and
    # its in-place update of the running statistics wrote into the samples
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))
    store = SampleStore({k: v for k, v in model.state_dict().items() if v.is_floating_point()},
                        max_samples=3)  # fmt: skip
    for _ in range(3):
        model.train()
        model(torch.randn(32, 5))
        store.collect()
    saved = store.samples().clone()
    predict(model.train(), store, torch.randn(6, 5) + 3.0, chunk=chunk)
    assert torch.equal(store.samples(), saved)


def test_float64_store_is_exact(tmp_path):
    torch.manual_seed(0)
    m = nn.Linear(3, 2).double()
    s = SampleStore(m, dtype=torch.float64)
    s.collect()
    x = torch.randn(5, 3, dtype=torch.float64)
    assert torch.equal(predict(m, s, x, probabilities=False)[0], m(x))
    s.save(tmp_path / "s.safetensors")
    back = SampleStore.load(tmp_path / "s.safetensors", m)
    assert back.buffer.dtype == torch.float64 and torch.equal(back.samples(), s.samples())
    with pytest.raises(TypeError, match="torch.float64, got torch.float16"):
        SampleStore(m, dtype=torch.float16)


# review (thirty-first session): checklist audit of the posterior module
def test_collect_failure_does_not_count_a_sample():
    with torch.device("meta"):
        m = nn.Linear(3, 2)
    store = SampleStore(m, device="cpu")
    with pytest.raises(NotImplementedError):
        store.collect()
    assert (store.count, store.calls, store.kept) == (0, 0, 0)  # (1, 1, 1): an unwritten row


def test_store_made_under_inference_mode_collects():
    m = nn.Linear(3, 2)
    with torch.inference_mode():
        store = SampleStore(m)
    assert store.collect()  # RuntimeError: Inplace update to inference tensor
    torch.testing.assert_close(store.sample(0)["weight"], m.weight.detach())


def test_store_loaded_under_inference_mode_collects(tmp_path):
    m = nn.Linear(3, 2)
    s = SampleStore(m)
    s.collect()
    s.save(tmp_path / "s.safetensors")
    with torch.inference_mode():
        store = SampleStore.load(tmp_path / "s.safetensors", m)
    assert store.collect()
    assert len(store) == 2


@pytest.mark.parametrize(
    "kw",
    [
        {"burn_in": np.int64(2)},
        {"thin": np.int32(2)},
        {"max_samples": np.int64(5)},
        {"reservoir": np.bool_(True)},
    ],
)
def test_store_takes_numpy_scalars(kw):
    store = SampleStore(nn.Linear(3, 2), **kw)
    ((k, v),) = kw.items()
    assert getattr(store, k) == v and type(getattr(store, k)) in (int, bool)


def test_predict_takes_numpy_chunk():
    m = nn.Linear(3, 2)
    s = SampleStore(m)
    s.collect()
    s.collect()
    assert predict(m, s, torch.randn(4, 3), chunk=np.int64(2)).shape == (2, 4, 2)


def test_chain_samples_predict_keeps_model_mode():
    from mtbkd.distill import ChainSamples

    def chain():
        m = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
        s = SampleStore(m, include="2.*")
        s.collect()
        return m.state_dict(), s

    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    ChainSamples([chain(), chain()]).predict(model, torch.randn(5, 3))
    assert model.training  # left in eval mode (posterior.predict keeps the mode)


def test_load_missing_metadata_is_value_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "s.safetensors"
    save_file({"samples": torch.zeros(1, 8)}, str(path), metadata={"format": "mtbkd.SampleStore/1"})
    with pytest.raises(ValueError):  # KeyError: 'names'
        SampleStore.load(path, nn.Linear(3, 2))
