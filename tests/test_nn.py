"""BayesLinear, bayesify and kl_divergence (MATH.md section 6)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtbkd import bayes_ops as B
from mtbkd import nn as mtbkd_nn
from mtbkd.nn import BayesLinear, bayesify, kl_divergence
from mtbkd.optim import SGLD


def test_shapes_and_defaults():
    layer = BayesLinear(7, 3)
    assert layer.weight_mu.shape == (3, 7) and layer.bias_rho.shape == (3,)
    assert torch.all(layer.weight_rho == -5.0)
    y = layer(torch.randn(4, 7))
    assert y.shape == (4, 3)
    y = layer(torch.randn(2, 5, 7))
    assert y.shape == (2, 5, 3)
    nobias = BayesLinear(7, 3, bias=False, mode="local")
    assert nobias.bias_mu is None and nobias(torch.randn(4, 7)).shape == (4, 3)


@pytest.mark.parametrize("mode", ["reparameterize", "local"])
def test_freeze_uses_posterior_mean(mode):
    layer = BayesLinear(6, 4, posterior_rho_init=0.0, mode=mode)
    x = torch.randn(5, 6)
    mean = F.linear(x, layer.weight_mu, layer.bias_mu)
    assert not torch.allclose(layer(x), mean)  # sigma ~ 0.69: samples differ from the mean
    layer.freeze()
    assert torch.equal(layer(x), mean)
    layer.unfreeze()
    assert not torch.allclose(layer(x), mean)


def test_reparameterize_mode_uses_the_fused_sample():
    layer = BayesLinear(5, 3, posterior_rho_init=-1.0)
    x = torch.randn(2, 5)
    torch.manual_seed(10)
    y = layer(x)
    torch.manual_seed(10)
    seed = B.new_seed()
    w = B.reparameterize(layer.weight_mu, layer.weight_rho, seed, 0)
    b = B.reparameterize(layer.bias_mu, layer.bias_rho, seed, B.counters_used(w.numel()))
    torch.testing.assert_close(y, F.linear(x, w, b))


@pytest.mark.parametrize("mode", ["reparameterize", "local"])
def test_backward_reaches_mu_and_rho(mode):
    layer = BayesLinear(5, 3, mode=mode)
    loss = layer(torch.randn(8, 5)).pow(2).mean() + layer.kl() / 100
    loss.backward()
    for p in layer.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_local_and_weight_sampling_give_the_same_output_distribution():
    torch.manual_seed(0)
    layer = BayesLinear(6, 3, posterior_rho_init=-0.5)
    with torch.no_grad():
        layer.weight_rho.add_(torch.randn_like(layer.weight_rho) * 0.3)
    x = torch.randn(1, 6)
    draws = 4000
    with torch.no_grad():
        y_weight = torch.cat([layer(x) for _ in range(draws)])
        layer.mode = "local"
        y_local = layer(x.expand(draws, 6).contiguous())
        # Analytic: mean x mu^T + b, variance x^2 (sigma^2)^T + sigma_b^2.
        mean = F.linear(x, layer.weight_mu, layer.bias_mu)[0]
        var = F.linear(x * x, F.softplus(layer.weight_rho) ** 2,
                       F.softplus(layer.bias_rho) ** 2)[0]  # fmt: skip
    se = (var / draws).sqrt()
    for y in (y_weight, y_local):
        assert torch.all((y.mean(0) - mean).abs() < 5 * se)
        # Var of the sample variance of a Gaussian: 2 var^2 / (n - 1).
        assert torch.all((y.var(0) - var).abs() < 5 * var * math.sqrt(2 / (draws - 1)))
    # Two-sample agreement too (not only each against the formula).
    assert torch.all((y_weight.mean(0) - y_local.mean(0)).abs() < 5 * math.sqrt(2) * se)


def test_kl_is_the_sum_of_gaussian_kls():
    layer = BayesLinear(4, 2, prior_sigma=0.5, prior_mu=0.1, posterior_rho_init=-2.0)
    kl = layer.kl()
    normal = torch.distributions.Normal
    q_w = normal(layer.weight_mu.double(), F.softplus(layer.weight_rho.double()))
    q_b = torch.distributions.Normal(layer.bias_mu.double(), F.softplus(layer.bias_rho.double()))
    prior = torch.distributions.Normal(0.1, 0.5)
    expected = (torch.distributions.kl_divergence(q_w, prior).sum()
                + torch.distributions.kl_divergence(q_b, prior).sum())  # fmt: skip
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip():
    torch.manual_seed(1)
    a = BayesLinear(5, 4, prior_sigma=0.3, posterior_rho_init=-3.0)
    with torch.no_grad():
        a.weight_rho.uniform_(-4, -2)
    b = BayesLinear(5, 4, prior_sigma=0.3, posterior_rho_init=-3.0)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"weight_mu", "weight_rho", "bias_mu", "bias_rho"}
    x = torch.randn(3, 5)
    torch.manual_seed(2)
    ya = a(x)
    torch.manual_seed(2)
    yb = b(x)
    assert torch.equal(ya, yb)
    assert torch.equal(a.kl(), b.kl())
    assert torch.equal(a.freeze()(x), b.freeze()(x))


def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
                         nn.Linear(8, 3))  # fmt: skip


def test_bayesify_selected_layers_keeps_weights_as_mean():
    model = _mlp()
    x = torch.randn(6, 4)
    expected = model(x)
    w_head = model[3].weight.detach().clone()
    bayesify(model, include="3", prior_sigma=0.2, posterior_rho_init=-6.0)
    assert isinstance(model[3], BayesLinear)
    assert type(model[0]) is nn.Linear and type(model[2][0]) is nn.Linear
    assert torch.equal(model[3].weight_mu, w_head)
    assert model[3].prior_sigma == 0.2
    model[3].freeze()
    torch.testing.assert_close(model(x), expected)


def test_bayesify_patterns_and_exclude():
    model = bayesify(_mlp(), exclude=["0"])
    kinds = [type(m).__name__ for m in (model[0], model[2][0], model[3])]
    assert kinds == ["Linear", "BayesLinear", "BayesLinear"]
    model = bayesify(_mlp(), include=lambda name, mod: mod.out_features == 8)
    assert [type(m).__name__ for m in (model[0], model[2][0], model[3])] == [
        "BayesLinear", "BayesLinear", "Linear"]  # fmt: skip
    assert isinstance(bayesify(nn.Linear(3, 2)), BayesLinear)
    with pytest.raises(ValueError, match="include"):
        bayesify(_mlp(), include="encoder.*")


def test_bayesify_keeps_a_shared_linear_shared():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    bayesify(model)
    assert isinstance(model[0], BayesLinear) and model[0] is model[2]
    assert torch.equal(model[0].weight_mu, shared.weight)
    assert kl_divergence(model) == model[0].kl()  # counted once


def test_bayesify_refuses_tied_weights_and_checks_its_options_first():
    # before: two Linear modules sharing a weight (or a head tied to an embedding) were untied
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    with pytest.raises(ValueError, match="'0' shares a parameter with '1' \\(tied weights\\)"):
        bayesify(nn.Sequential(a, b))
    lm = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    lm[1].weight = lm[0].weight
    with pytest.raises(ValueError, match="'1' shares a parameter with '0'"):
        bayesify(lm)
    assert bayesify(lm, exclude="1")[1].weight is lm[0].weight  # left as it is
    # options were only checked when a layer was converted; include=3 was a bare TypeError
    for kw in ({"mode": "bogus"}, {"prior_sigma": -1.0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            bayesify(nn.Sequential(nn.Linear(2, 2)), exclude="*", **kw)
    with pytest.raises(TypeError, match="include/exclude must be a pattern"):
        bayesify(nn.Sequential(nn.Linear(2, 2)), include=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_local_mode_noise_in_half_precision_is_the_posteriors(dtype):
    # before: fp16's variance floor (6e-5, above sigma^2 = 4.5e-5) gave noise of std 0.008 for
    # any input; the float32 value here is 1.3e-4
    torch.manual_seed(0)
    layer = BayesLinear(4, 2, bias=False, mode="local", dtype=dtype)
    layer.weight_mu.data.zero_()
    x = torch.full((20000, 4), 0.01, dtype=dtype, requires_grad=True)
    y = layer(x)
    sigma = F.softplus(torch.tensor(-5.0)).item()
    assert y.dtype == dtype
    assert y.float().std().item() == pytest.approx(sigma * 0.01 * 2, rel=0.05)
    y.float().sum().backward()
    assert bool(torch.isfinite(x.grad).all()) and bool(torch.isfinite(layer.weight_rho.grad).all())


def test_kl_divergence_sums_layers():
    model = bayesify(_mlp())
    total = kl_divergence(model)
    expected = sum(m.kl() for m in model.modules() if isinstance(m, BayesLinear))
    torch.testing.assert_close(total, expected)
    assert kl_divergence(nn.Linear(2, 2)).item() == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        BayesLinear(3, 2, mode="flipout")
    with pytest.raises(ValueError, match="prior_sigma"):
        BayesLinear(3, 2, prior_sigma=-1.0)
    with pytest.raises(ValueError, match="prior_sigma"):
        BayesLinear(3, 2, prior_sigma=0.0)
    with pytest.raises(ValueError, match="prior_sigma must be at least"):
        BayesLinear(3, 2, prior_sigma=1e-20)
    with pytest.raises(ValueError, match="in_features"):
        BayesLinear(0, 2)
    layer = BayesLinear(3, 2)
    with torch.no_grad():
        layer.weight_mu[0, 0] = float("nan")
    with pytest.raises(ValueError, match="mu contains non-finite"):
        layer(torch.randn(1, 3))
    with pytest.raises(ValueError, match="mu contains non-finite"):
        layer.kl()


def test_bayesify_passes_its_options_and_matches_any_pattern():
    # mode was not passed on (every layer sampled weights); a list of patterns needed every
    # pattern to match; bias_rho ignored posterior_rho_init; a bare nn.Linear was converted
    # whatever include / exclude said
    model = bayesify(_mlp(), include=["0", "3"], mode="local", posterior_rho_init=-2.0,
                     prior_mu=0.5)  # fmt: skip
    assert [type(m).__name__ for m in (model[0], model[2][0], model[3])] == [
        "BayesLinear", "Linear", "BayesLinear"]  # fmt: skip
    for m in (model[0], model[3]):
        assert m.mode == "local" and m.prior_mu == 0.5
        assert torch.all(m.weight_rho == -2.0) and torch.all(m.bias_rho == -2.0)
    lin = nn.Linear(3, 2)
    assert bayesify(lin, exclude="*") is lin
    # an include that matches nothing is an error, as for a model (was: returned silently)
    with pytest.raises(ValueError, match="does not match the nn.Linear given"):
        bayesify(lin, include=lambda name, mod: False)
    layer = BayesLinear(3, 2, posterior_rho_init=-1.5)
    assert torch.all(layer.bias_rho == -1.5)


def test_infinite_prior_mean_is_refused():
    for bad in (float("-inf"), float("inf"), float("nan")):
        with pytest.raises(ValueError, match="prior_mu"):
            BayesLinear(3, 2, prior_mu=bad)
        with pytest.raises(ValueError, match="prior_mu"):
            B.gaussian_kl(torch.zeros(3), torch.zeros(3), prior_mu=bad)


def _module_backends():
    from mtbkd.ops import backend_status

    device = "cuda" if torch.cuda.is_available() else "cpu"
    status = backend_status()
    out = []
    for be in ("reference", "cpu", "triton", "cuda"):
        reason = status[be]
        if reason is None and be in ("cpu", "cuda") and be != device:
            reason = f"the {be} backend does not run on {device} tensors"
        mark = pytest.mark.skipif(reason is not None, reason=str(reason))
        out.append(pytest.param(be, marks=mark))
    return out


@pytest.mark.parametrize("backend", _module_backends())
def test_bayes_linear_is_the_same_on_every_backend(backend, monkeypatch):
    # The module (sample, bias offset, matmul, closed-form KL, backward) on a forced backend
    # against the float64 formula: w = mu + softplus(rho) eps with eps the reference stream of the
    # layer's seed, KL by torch.distributions, and autograd of that formula.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(4)
    layer = BayesLinear(37, 5, posterior_rho_init=-1.0, prior_sigma=0.5).double().to(device)
    x = torch.randn(6, 37, dtype=torch.float64, device=device)
    monkeypatch.setenv("MTBKD_BACKEND", backend)
    torch.manual_seed(11)
    y = layer(x)
    kl = layer.kl()
    (y.pow(2).sum() + kl).backward()
    monkeypatch.delenv("MTBKD_BACKEND")
    torch.manual_seed(11)
    seed = B.new_seed()
    n_w = layer.weight_mu.numel()
    eps_w = B.philox_normal(seed, 0, n_w).double().to(device).view(5, 37)
    eps_b = B.philox_normal(seed, B.counters_used(n_w), 5).double().to(device)
    p = {k: v.detach().clone().requires_grad_(True) for k, v in layer.named_parameters()}
    w = p["weight_mu"] + F.softplus(p["weight_rho"]) * eps_w
    b = p["bias_mu"] + F.softplus(p["bias_rho"]) * eps_b
    y_true = F.linear(x, w, b)
    prior = torch.distributions.Normal(0.0, 0.5)
    kl_true = sum(
        torch.distributions.kl_divergence(
            torch.distributions.Normal(p[m], F.softplus(p[r])), prior
        ).sum()
        for m, r in (("weight_mu", "weight_rho"), ("bias_mu", "bias_rho"))
    )
    (y_true.pow(2).sum() + kl_true).backward()
    tol = 1e-5  # the backends' eps differ from the reference stream by float32 rounding
    torch.testing.assert_close(y.detach(), y_true.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(kl.detach(), kl_true.detach(), atol=1e-10, rtol=1e-10)
    for name, q in layer.named_parameters():
        torch.testing.assert_close(q.grad, p[name].grad, atol=tol, rtol=tol, msg=name)


def test_bayesify_keeps_shared_layers_whole_and_the_replaced_layers_state():
    # found by a bug hunt: a layer shared under two names was converted under the chosen one
    # only (silently untied), and a frozen or eval-mode layer came back trainable
    shared = nn.Linear(3, 3)
    m = nn.Sequential(shared, nn.Tanh(), shared)
    with pytest.raises(ValueError, match="'0' is the same nn.Linear as '2'"):
        bayesify(m, include="0")
    bayesify(m)
    assert isinstance(m[0], BayesLinear) and m[0] is m[2]
    body = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    body[0].requires_grad_(False)
    body.eval()
    bayesify(body)
    assert not body[0].weight_mu.requires_grad and not body[0].weight_rho.requires_grad
    assert not body[0].bias_rho.requires_grad and body[1].weight_rho.requires_grad
    assert not body[0].training and not body[1].training


def test_local_mode_under_fp16_autocast_keeps_its_noise():
    # found by a bug hunt: autocast ran the variance matmul in fp16, where it underflowed to 0:
    # no noise, and NaN gradients for rho through the floor of the square root
    torch.manual_seed(0)
    layer = BayesLinear(64, 32, bias=False, mode="local", posterior_rho_init=-9.0)
    x = torch.randn(256, 64) * 0.05
    x[0] = 0.0
    with torch.autocast("cpu", dtype=torch.float16):
        y = layer(x)
    y.float().sum().backward()
    assert torch.isfinite(layer.weight_rho.grad).all()
    noise = (y.detach().float() - x @ layer.weight_mu.detach().T)[1:]
    sigma = torch.nn.functional.softplus(torch.tensor(-9.0))
    want = (x[1:] ** 2 @ torch.full((64, 32), float(sigma) ** 2)).sqrt()
    # the noise has the analytic std (fp16 rounding of the mean adds ~1e-4 relative)
    ratio = float((noise / want).std())
    assert 0.8 < ratio < 1.2, ratio


def test_sampling_layer_compiles_with_fullgraph():
    # found by a bug hunt: the seed drawn in the forward (.item()) was range-checked with a
    # Python branch, which torch.compile(fullgraph=True) could not trace
    torch.manual_seed(0)
    layer = BayesLinear(3, 2, posterior_rho_init=-1.0)
    x = torch.randn(5, 3)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    first, second = compiled(x), compiled(x)
    torch.manual_seed(3)
    assert torch.equal(first, layer(x))  # the same draw as eager under the same seed
    assert not torch.equal(first, second)  # a fresh draw per call


def test_numpy_numbers_are_accepted_like_nn_linear():
    # found by a bug hunt: np.int64 sizes and np.float32 options were refused (nn.Linear and
    # SGLD take them); bools stay refused
    import numpy as np

    layer = BayesLinear(np.int64(4), np.int32(3), prior_sigma=np.float32(0.5),
                        posterior_rho_init=np.int64(-3), prior_mu=np.float16(0.25))  # fmt: skip
    assert (layer.in_features, layer.out_features) == (4, 3)
    assert type(layer.in_features) is int and type(layer.out_features) is int
    assert (layer.prior_sigma, layer.prior_mu, layer.posterior_rho_init) == (0.5, 0.25, -3.0)
    assert all(type(v) is float for v in (layer.prior_sigma, layer.prior_mu,
                                          layer.posterior_rho_init))  # fmt: skip
    assert layer.weight_mu.shape == (3, 4) and torch.all(layer.weight_rho == -3.0)
    assert layer(torch.randn(2, 4)).shape == (2, 3)
    model = bayesify(nn.Sequential(nn.Linear(4, 2)), prior_sigma=np.float64(0.3))
    assert model[0].prior_sigma == 0.3
    for bad in (True, np.bool_(True)):
        with pytest.raises((TypeError, ValueError), match="in_features"):
            BayesLinear(bad, 2)
        with pytest.raises(TypeError, match="prior_sigma"):
            BayesLinear(2, 2, prior_sigma=bad)
    with pytest.raises(ValueError, match="in_features"):
        BayesLinear(3.0, 2)


@pytest.mark.parametrize("mode", ["reparameterize", "local"])
@pytest.mark.parametrize("name", ["weight_mu", "weight_rho", "bias_mu", "bias_rho"])
@pytest.mark.parametrize("backend", _module_backends())
def test_non_finite_parameter_is_named(backend, name, mode, monkeypatch):
    # found by a bug hunt: a NaN in bias_rho was "rho contains non-finite values" (which rho?),
    # and in local mode the forward returned NaN outputs silently
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setenv("MTBKD_BACKEND", backend)
    layer = BayesLinear(4, 3, mode=mode).to(device)
    with torch.no_grad():
        getattr(layer, name)[1] = float("nan")
    x = torch.randn(2, 4, device=device)
    with pytest.raises(ValueError, match=f"BayesLinear.{name} contains non-finite values"):
        layer(x)
    with pytest.raises(ValueError, match=f"BayesLinear.{name} contains non-finite values"):
        layer.kl()
    layer.freeze()  # the posterior mean alone is used: a bad rho does not matter there
    if name.endswith("_rho"):
        assert torch.isfinite(layer(x)).all()


def test_local_mode_forward_runs_under_fake_tensors():
    # a review: the local-mode finiteness check read values (.tolist()), which FakeTensorMode
    # (shape propagation, export) and CUDA-graph capture cannot
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = BayesLinear(4, 3, mode="local")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = layer(mode.from_tensor(torch.randn(2, 4)))
    assert out.shape == (2, 3)


def test_sampling_forward_and_sgld_step_run_under_fake_tensors():
    # session 32: new_seed() read its draw (.item()), which a bare FakeTensorMode (shape and
    # memory estimation) cannot; there the seed is 0 and torch's generator is left alone
    from torch._subclasses.fake_tensor import FakeTensorMode

    state = torch.get_rng_state()
    with FakeTensorMode():
        layer = BayesLinear(4, 3)
        out = layer(torch.randn(2, 4))
        assert out.shape == (2, 3)
        opt = SGLD(layer.parameters(), lr=1e-3, num_data=10)
        out.sum().backward()
        opt.step()
        assert opt.state[layer.weight_mu]["step"] == 1
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------
# record_kl: the KL from the forward's own sampling passes
# ---------------------------------------------------------------------------------------------


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = BayesLinear(9, 6, posterior_rho_init=-1.0, prior_sigma=0.6)
        self.head = BayesLinear(6, 3, posterior_rho_init=-2.0)
        self.unused = BayesLinear(4, 2)  # not called in the forward
        self.local = BayesLinear(6, 3, mode="local")

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(h) + self.head(h * 0.5) + self.local(h)  # head runs twice


def _grads(model, x, record: bool, seed=5):
    torch.manual_seed(seed)
    if record:
        with mtbkd_nn.record_kl(model) as rec:
            y = model(x)
        kl = rec.kl
    else:
        y = model(x)
        kl = kl_divergence(model)
    (y.pow(2).sum() + kl / 7).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return y.detach(), kl.detach(), grads


def test_record_kl_is_kl_divergence_from_the_forwards_passes():
    torch.manual_seed(1)
    model = _TwoHeads().double()
    x = torch.randn(4, 9, dtype=torch.float64)
    fused, plain = _grads(model, x, True), _grads(model, x, False)
    assert torch.equal(fused[0], plain[0])  # the same samples
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-14, atol=0)
    for name in plain[2]:
        torch.testing.assert_close(fused[2][name], plain[2][name], rtol=1e-13, atol=1e-15)
    torch.manual_seed(5)
    with mtbkd_nn.record_kl(model) as rec:
        assert rec.kl is None
        model(x)
    # body and head from their forwards (head's last one), unused and local by kl()
    assert rec.from_forward == 2


def test_record_kl_without_grad_nested_and_after_an_error():
    model = _TwoHeads()
    x = torch.randn(2, 9)
    with torch.no_grad(), mtbkd_nn.record_kl(model) as rec:
        model(x)
    torch.testing.assert_close(rec.kl, kl_divergence(model).detach())
    assert rec.from_forward == 2 and not rec.kl.requires_grad
    with mtbkd_nn.record_kl(model) as outer:
        with mtbkd_nn.record_kl(model.head) as inner:
            model(x)
    assert inner.from_forward == 1 and outer.from_forward == 1  # head reports to the inner one
    torch.testing.assert_close(outer.kl, kl_divergence(model))
    with pytest.raises(RuntimeError, match="boom"):
        with mtbkd_nn.record_kl(model) as failed:
            raise RuntimeError("boom")
    assert failed.kl is None and not mtbkd_nn._ACTIVE.get()  # the block is closed
    with mtbkd_nn.record_kl(nn.Linear(3, 3)) as none:
        pass
    assert float(none.kl) == 0.0


def test_record_kl_leaves_compiled_and_vmapped_forwards_alone():
    layer = BayesLinear(5, 3)
    x = torch.randn(2, 5)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with mtbkd_nn.record_kl(layer) as rec:
        compiled(x)
    assert rec.from_forward == 0
    torch.testing.assert_close(rec.kl, layer.kl())


def test_record_kl_shares_the_forwards_node():
    # documented: back-propagate it in the same backward as the output, or retain the graph
    layer = BayesLinear(6, 2)
    x = torch.randn(3, 6)
    with mtbkd_nn.record_kl(layer) as rec:
        y = layer(x)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        rec.kl.backward()
    with mtbkd_nn.record_kl(layer) as rec:
        y = layer(x)
    y.sum().backward(retain_graph=True)
    rec.kl.backward()


def test_record_kl_is_per_thread():
    import threading

    layer = BayesLinear(4, 2)
    seen = {}

    def other():
        seen["record"] = mtbkd_nn._recording(layer)

    with mtbkd_nn.record_kl(layer):
        assert mtbkd_nn._recording(layer) is not None
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen["record"] is None


def test_record_kl_keeps_the_gradient_through_no_grad_passes_and_checkpointing():
    # a review: a no_grad forward inside the block replaced the KL with one without a gradient,
    # and a non-reentrant checkpoint recomputed with another op (a different saved-tensor count)
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(3)
    model = _TwoHeads()
    x = torch.randn(3, 9)
    want = torch.autograd.grad(kl_divergence(model), list(model.parameters()), allow_unused=True)

    def kl_grads(run):
        with mtbkd_nn.record_kl(model) as rec:
            y = run()
        got = torch.autograd.grad(y.sum() * 0 + rec.kl, list(model.parameters()),
                                  allow_unused=True)  # fmt: skip
        return rec, got

    def eval_pass_after():
        y = model(x)
        with torch.no_grad():
            model(x)
        return y

    runs = {
        "no_grad pass after": eval_pass_after,
        "reentrant checkpoint": lambda: checkpoint(model, x.requires_grad_(), use_reentrant=True),
        "non-reentrant checkpoint": lambda: checkpoint(model, x, use_reentrant=False),
    }
    for name, run in runs.items():
        rec, got = kl_grads(run)
        for a, b in zip(got, want):
            if b is not None:
                torch.testing.assert_close(a, b, msg=name)


def test_record_kl_under_functional_call_is_the_modules_own_kl():
    # a review: layers that ran took the swapped-in parameters' KL, the others the module's own
    model = _TwoHeads()
    swapped = {k: v * 1.5 for k, v in model.named_parameters() if k.startswith("head.")}
    with mtbkd_nn.record_kl(model) as rec:
        torch.func.functional_call(model, swapped, (torch.randn(2, 9),))
    torch.testing.assert_close(rec.kl, kl_divergence(model))
    assert rec.from_forward == 1  # body ran on its own parameters


def test_record_kl_blocks_of_asyncio_tasks_are_apart():
    import asyncio

    layer = BayesLinear(4, 2)

    async def task():
        with mtbkd_nn.record_kl(layer) as rec:
            await asyncio.sleep(0)  # the other task opens its block here
            layer(torch.randn(1, 4))
            await asyncio.sleep(0)
        return rec.from_forward

    async def both():
        return await asyncio.gather(task(), task())

    assert asyncio.run(both()) == [1, 1]


def test_record_kl_inside_a_compiled_function_and_closed_in_another_context():
    import contextvars

    torch.manual_seed(6)
    model = _TwoHeads()
    x = torch.randn(2, 9)

    def step(x):
        with mtbkd_nn.record_kl(model) as rec:
            y = model(x)
        return y.sum() * 0 + rec.kl

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x)  # (it raised: ContextVar)
    torch.testing.assert_close(got, kl_divergence(model))
    # entered in one context, left in another (an async generator shut down by the loop)
    block = mtbkd_nn.record_kl(model)
    contextvars.copy_context().run(block.__enter__)
    block.__exit__(None, None, None)
    assert not mtbkd_nn._ACTIVE.get()


def test_record_kl_with_computed_parameters_under_non_reentrant_checkpointing():
    # parameters computed in the graph (functional_call): the plain sampling op, so that the
    # recomputation saves the same tensors (the joint op saved a computed mu too: it raised)
    from torch.utils.checkpoint import checkpoint

    layer = BayesLinear(6, 3)
    params = {k: v * 1.0 for k, v in layer.named_parameters()}
    x = torch.randn(2, 6)
    with mtbkd_nn.record_kl(layer) as rec:
        y = checkpoint(lambda x: torch.func.functional_call(layer, params, (x,)), x,
                       use_reentrant=False)  # fmt: skip
    (y.sum() + rec.kl).backward()
    assert rec.from_forward == 0
    torch.testing.assert_close(rec.kl, kl_divergence(layer))


def test_meta_device_layers_give_meta_outputs_in_both_modes():
    for mode in ("reparameterize", "local"):
        layer = BayesLinear(3, 2, device="meta", mode=mode)
        out = layer(torch.randn(1, 3, device="meta"))
        assert out.device.type == "meta" and out.shape == (1, 2)
        kl = layer.kl()
        assert kl.device.type == "meta" and kl.shape == ()


def test_repr_shows_a_nonzero_prior_mean():
    # two layers whose KLs differ printed alike
    a, b = BayesLinear(4, 3, prior_mu=0.0), BayesLinear(4, 3, prior_mu=0.5)
    assert "prior_mu" not in repr(a) and "prior_mu=0.5" in repr(b)


def test_model_arguments_must_be_modules():
    for fn in (kl_divergence, bayesify, lambda m: mtbkd_nn.record_kl(m).__enter__()):
        for bad in ([nn.Linear(2, 2)], "model", 3):
            with pytest.raises(TypeError, match="model must be an nn.Module"):
                fn(bad)


def test_bayesify_names_exclude_when_it_leaves_nothing():
    # an audit (thirtieth session): the error blamed include, which matched both layers
    m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"exclude=\['0', '2'\] leaves out every nn.Linear"):
        bayesify(m, include="*", exclude=["0", "2"])
    with pytest.raises(ValueError, match="include='x' matches no nn.Linear"):
        bayesify(m, include="x")
