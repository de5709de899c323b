"""BayesConv1d / 2d / 3d and bayesify of convolutions (MATH.md section 6)."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import mtbkd
from mtbkd import bayes_ops as B
from mtbkd.nn import (
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesLayer,
    BayesLinear,
    bayesify,
    kl_divergence,
    record_kl,
)
from mtbkd.posterior import SampleStore, predict

CONVS = {1: (nn.Conv1d, BayesConv1d, F.conv1d), 2: (nn.Conv2d, BayesConv2d, F.conv2d),
         3: (nn.Conv3d, BayesConv3d, F.conv3d)}  # fmt: skip
SIZE = {1: (11,), 2: (7, 8), 3: (5, 4, 6)}

# stride, padding, dilation, groups, padding_mode
GEOMETRIES = [
    (1, 0, 1, 1, "zeros"),
    (2, 1, 1, 2, "zeros"),
    (1, "same", 2, 1, "zeros"),
    (1, "valid", 1, 2, "zeros"),
    (2, 1, 1, 1, "reflect"),
    (1, 2, 1, 2, "replicate"),
    (1, 1, 2, 1, "circular"),
]


def _pair(n, geometry, **kw):
    stride, padding, dilation, groups, padding_mode = geometry
    conv_t, bayes_t, _ = CONVS[n]
    args = (4, 6, 3, stride, padding, dilation, groups)
    return conv_t(*args, padding_mode=padding_mode), bayes_t(*args, padding_mode=padding_mode, **kw)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_initialised_and_shaped_like_nn_conv(n):
    conv_t, bayes_t, _ = CONVS[n]
    torch.manual_seed(3)
    conv = conv_t(4, 6, 3, groups=2)
    torch.manual_seed(3)
    layer = bayes_t(4, 6, 3, groups=2, posterior_rho_init=-4.0)
    # the same draws as nn.ConvNd's init: Kaiming uniform kernel, bias in +-1/sqrt(fan_in)
    assert torch.equal(layer.weight_mu, conv.weight) and torch.equal(layer.bias_mu, conv.bias)
    assert torch.all(layer.weight_rho == -4.0) and torch.all(layer.bias_rho == -4.0)
    assert isinstance(layer, BayesLayer)
    assert layer.kernel_size == conv.kernel_size and layer.stride == conv.stride
    nobias = bayes_t(4, 6, 3, bias=False)
    assert nobias.bias_mu is None and nobias.bias_rho is None


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("mode", ["reparameterize", "local"])
def test_frozen_layer_is_nn_conv_and_from_conv_keeps_everything(n, geometry, mode):
    conv, _ = _pair(n, geometry)
    layer = CONVS[n][1].from_conv(conv, mode=mode, posterior_rho_init=-1.0)
    x = torch.randn(2, 4, *SIZE[n])
    layer.freeze()
    assert torch.equal(layer(x), conv(x))
    layer.unfreeze()
    y = layer(x)
    assert y.shape == conv(x).shape and not torch.allclose(y, conv(x))
    # the unbatched input nn.ConvNd takes
    assert layer(x[0]).shape == conv(x[0]).shape


@pytest.mark.parametrize("geometry", [GEOMETRIES[1], GEOMETRIES[4], GEOMETRIES[6]])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_reparameterize_mode_convolves_with_the_fused_sample(n, geometry):
    conv, layer = _pair(n, geometry, posterior_rho_init=-1.0)
    layer.weight_mu.data.copy_(conv.weight)
    layer.bias_mu.data.copy_(conv.bias)
    x = torch.randn(3, 4, *SIZE[n])
    torch.manual_seed(10)
    y = layer(x)
    torch.manual_seed(10)
    seed = B.new_seed()
    w = B.reparameterize(layer.weight_mu, layer.weight_rho, seed, 0)
    b = B.reparameterize(layer.bias_mu, layer.bias_rho, seed, B.counters_used(w.numel()))
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(b)
    torch.testing.assert_close(y, conv(x))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sample_kl_and_gradients_against_the_float64_formula(n):
    # w = mu + softplus(rho) eps with eps the reference Philox stream of the layer's seed, the KL
    # by torch.distributions, and autograd of both, against the layer in float64.
    conv_t, bayes_t, conv_fn = CONVS[n]
    torch.manual_seed(4)
    layer = bayes_t(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect",
                    posterior_rho_init=-1.0, prior_sigma=0.5, prior_mu=0.1).double()  # fmt: skip
    x = torch.randn(2, 4, *SIZE[n], dtype=torch.float64)
    torch.manual_seed(11)
    y = layer(x)
    kl = layer.kl()
    (y.pow(2).sum() + kl).backward()
    torch.manual_seed(11)
    seed = B.new_seed()
    n_w = layer.weight_mu.numel()
    eps_w = B.philox_normal(seed, 0, n_w, backend="reference").double()
    eps_b = B.philox_normal(seed, B.counters_used(n_w), 6, backend="reference").double()
    p = {k: v.detach().clone().requires_grad_(True) for k, v in layer.named_parameters()}
    w = p["weight_mu"] + F.softplus(p["weight_rho"]) * eps_w.view_as(p["weight_mu"])
    b = p["bias_mu"] + F.softplus(p["bias_rho"]) * eps_b
    padded = F.pad(x, layer._reversed_padding_repeated_twice, mode="reflect")
    y_true = conv_fn(padded, w, b, stride=2, groups=2)
    # (float64 prior parameters: Normal(0.1, 0.5) would hold them in float32)
    prior = torch.distributions.Normal(*torch.tensor([0.1, 0.5], dtype=torch.float64))
    kl_true = sum(
        torch.distributions.kl_divergence(
            torch.distributions.Normal(p[m], F.softplus(p[r])), prior
        ).sum()
        for m, r in (("weight_mu", "weight_rho"), ("bias_mu", "bias_rho"))
    )
    (y_true.pow(2).sum() + kl_true).backward()
    tol = 1e-5  # the backend's eps differ from the reference stream by float32 rounding
    torch.testing.assert_close(y.detach(), y_true.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(kl.detach(), kl_true.detach(), atol=1e-10, rtol=1e-10)
    for name, q in layer.named_parameters():
        assert q.grad.abs().sum() > 0, name
        torch.testing.assert_close(q.grad, p[name].grad, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_local_and_kernel_sampling_give_each_output_the_same_marginal(padding_mode):
    torch.manual_seed(0)
    layer = BayesConv2d(2, 3, 3, padding=1, padding_mode=padding_mode, posterior_rho_init=-0.5)
    with torch.no_grad():
        layer.weight_rho.add_(torch.randn_like(layer.weight_rho) * 0.3)
    x = torch.randn(1, 2, 4, 5)
    draws = 3000
    with torch.no_grad():
        y_kernel = torch.cat([layer(x) for _ in range(draws)])
        layer.mode = "local"
        y_local = layer(x.expand(draws, *x.shape[1:]).contiguous())
        # analytic: mean conv(x, mu) + b, variance conv(x^2, sigma^2) + sigma_b^2
        layer.mode = "reparameterize"
        layer.freeze()
        mean = layer(x)[0]
        var = layer._affine(x * x, F.softplus(layer.weight_rho) ** 2,
                            F.softplus(layer.bias_rho) ** 2)[0]  # fmt: skip
    se = (var / draws).sqrt()
    for y in (y_kernel, y_local):
        assert torch.all((y.mean(0) - mean).abs() < 5 * se)
        # Var of the sample variance of a Gaussian: 2 var^2 / (n - 1).
        assert torch.all((y.var(0) - var).abs() < 5 * var * math.sqrt(2 / (draws - 1)))
    # a sampled kernel correlates the outputs of one example; local sampling does not
    a, b = y_kernel[:, 0, 1, 1], y_kernel[:, 0, 1, 2]
    assert torch.corrcoef(torch.stack([a, b]))[0, 1].abs() > 0.2
    a, b = y_local[:, 0, 1, 1], y_local[:, 0, 1, 2]
    assert torch.corrcoef(torch.stack([a, b]))[0, 1].abs() < 5 / math.sqrt(draws)


@pytest.mark.parametrize("mode", ["reparameterize", "local"])
def test_backward_reaches_every_parameter(mode):
    layer = BayesConv1d(3, 4, 5, padding=2, mode=mode)
    loss = layer(torch.randn(2, 3, 9)).pow(2).mean() + layer.kl() / 100
    loss.backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def _cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 5),
    )  # fmt: skip


def test_bayesify_converts_convolutions_and_linear_layers_by_default():
    torch.manual_seed(0)
    model = _cnn()
    x = torch.randn(3, 1, 6, 6)
    before = model(x)
    bayesify(model, posterior_rho_init=-3.0)
    assert [type(m) for m in model if isinstance(m, BayesLayer)] == [
        BayesConv2d, BayesConv2d, BayesLinear,
    ]  # fmt: skip
    assert model[2].groups == 2 and model[0].padding == (1, 1)
    for m in model:
        if isinstance(m, BayesLayer):
            m.freeze()
    torch.testing.assert_close(model(x), before)
    with record_kl(model) as rec:
        for m in model:
            if isinstance(m, BayesLayer):
                m.unfreeze()
        model(x)
    assert rec.from_forward == 3
    torch.testing.assert_close(rec.kl, kl_divergence(model))


def test_bayesify_layers_restricts_the_types():
    model = bayesify(_cnn(), layers=nn.Linear)
    assert type(model[0]) is nn.Conv2d and type(model[5]) is BayesLinear
    model = bayesify(_cnn(), layers=[nn.Conv2d])
    assert type(model[0]) is BayesConv2d and type(model[5]) is nn.Linear
    with pytest.raises(ValueError, match=r"include='0' matches no nn.Linear module of the model "
                       r"\(it matches nn.Conv2d, which layers leaves out\)"):  # fmt: skip
        bayesify(_cnn(), include="0", layers=nn.Linear)
    with pytest.raises(ValueError, match=r"layers: nn.ConvTranspose2d has no Bayesian layer"):
        bayesify(_cnn(), layers=(nn.Linear, nn.ConvTranspose2d))
    with pytest.raises(ValueError, match="layers must name at least one"):
        bayesify(_cnn(), layers=[])
    with pytest.raises(TypeError, match="layers must be a layer type"):
        bayesify(_cnn(), layers="linear")
    # a bare layer: converted, or refused when include / layers leave it out
    assert type(bayesify(nn.Conv3d(2, 2, 1))) is BayesConv3d
    assert type(bayesify(nn.Conv1d(2, 2, 1), layers=nn.Linear)) is nn.Conv1d
    with pytest.raises(ValueError, match=r"layers \(nn.Linear\) leaves out the nn.Conv1d given"):
        bayesify(nn.Conv1d(2, 2, 1), include="", layers=nn.Linear)


def test_bayesify_keeps_a_shared_convolution_shared_and_its_state():
    conv = nn.Conv1d(2, 2, 3, padding=1)
    conv.weight.requires_grad_(False)
    conv.eval()
    model = nn.Sequential(conv, nn.Tanh(), conv)
    bayesify(model)
    assert model[0] is model[2] and type(model[0]) is BayesConv1d
    assert not model[0].training
    assert not model[0].weight_mu.requires_grad and not model[0].weight_rho.requires_grad
    assert model[0].bias_mu.requires_grad


def test_from_conv_refuses_other_types_and_bad_geometry_is_torchs_error():
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d, got Conv1d"):
        BayesConv2d.from_conv(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d, got ConvTranspose2d"):
        BayesConv2d.from_conv(nn.ConvTranspose2d(2, 2, 1))
    with pytest.raises(ValueError, match="divisible by groups"):
        BayesConv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        BayesConv2d(4, 6, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding_mode"):
        BayesConv2d(4, 6, 3, padding_mode="mirror")
    for name, kw in (("in_channels", {"in_channels": 0}), ("out_channels", {"out_channels": True}),
                     ("groups", {"groups": 1.5})):  # fmt: skip
        args = {"in_channels": 2, "out_channels": 2, "kernel_size": 1, **kw}
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            BayesConv2d(**args)
    with pytest.raises(ValueError, match="mode must be one of"):
        BayesConv1d(2, 2, 1, mode="flipout")
    with pytest.raises(ValueError, match="prior_sigma"):
        BayesConv1d(2, 2, 1, prior_sigma=0.0)
    # numpy numbers as nn.Conv2d takes them
    layer = BayesConv2d(np.int64(2), np.int64(3), np.int64(3), prior_sigma=np.float32(0.5))
    assert layer.in_channels == 2 and layer.weight_mu.shape == (3, 2, 3, 3)


def test_state_dict_round_trip_and_repr():
    a = BayesConv2d(2, 4, (3, 1), stride=(2, 1), padding_mode="reflect", padding=1, prior_mu=0.5)
    b = BayesConv2d(2, 4, (3, 1), stride=(2, 1), padding_mode="reflect", padding=1, prior_mu=0.5)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"weight_mu", "weight_rho", "bias_mu", "bias_rho"}
    x = torch.randn(1, 2, 6, 5)
    torch.manual_seed(1)
    ya = a(x)
    torch.manual_seed(1)
    assert torch.equal(b(x), ya)
    assert repr(a) == (
        "BayesConv2d(2, 4, kernel_size=(3, 1), stride=(2, 1), padding=(1, 1), "
        "padding_mode='reflect', bias=True, prior_sigma=1.0, prior_mu=0.5, "
        "mode='reparameterize', frozen=False)"
    )


@pytest.mark.parametrize("mode", ["reparameterize", "local"])
@pytest.mark.parametrize("name", ["weight_mu", "weight_rho", "bias_mu", "bias_rho"])
def test_non_finite_parameter_is_named(name, mode):
    layer = BayesConv3d(2, 2, 1, mode=mode)
    with torch.no_grad():
        getattr(layer, name).view(-1)[0] = float("nan")
    msg = f"BayesConv3d.{name} contains non-finite values"
    with pytest.raises(ValueError, match=msg):
        layer(torch.randn(1, 2, 2, 2, 2))
    with pytest.raises(ValueError, match=msg):
        layer.kl()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_local_mode_keeps_its_noise_in_half_precision(dtype):
    torch.manual_seed(0)
    layer = BayesConv1d(8, 4, 3, mode="local").to(dtype)  # sigma ~ 0.0067: sigma^2 under fp16's
    x = torch.randn(4000, 8, 3, dtype=dtype)
    with torch.no_grad():
        y = layer(x).float()
        mean = F.conv1d(x.float(), layer.weight_mu.float(), layer.bias_mu.float())
        var = F.conv1d(x.float() ** 2, F.softplus(layer.weight_rho.float()) ** 2,
                       F.softplus(layer.bias_rho.float()) ** 2)  # fmt: skip
    ratio = ((y - mean) ** 2).mean() / var.mean()  # the noise's variance over the posterior's
    assert 0.8 < ratio < 1.25, ratio


def test_sampling_convolution_compiles_with_fullgraph():
    torch.manual_seed(0)
    layer = BayesConv2d(3, 4, 3, padding=1, padding_mode="replicate")
    x = torch.randn(2, 3, 5, 5)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.manual_seed(5)
    y = compiled(x)
    torch.manual_seed(5)
    torch.testing.assert_close(y, layer(x))


def test_predict_runs_a_bayesian_cnn_sample_by_sample():
    # a sampling Bayesian convolution reads its seed on the host: predict runs one sample per
    # call; each sample's kernel mean comes from the store
    torch.manual_seed(0)
    model = bayesify(_cnn(), layers=nn.Conv2d, posterior_rho_init=-30.0)  # sigma ~ 1e-13
    store = SampleStore(model, include=["0.weight_mu"])
    means = []
    for shift in (0.0, 0.5):
        with torch.no_grad():
            model[0].weight_mu.add_(shift)
        store.collect()
        means.append(model[0].weight_mu.detach().clone())
    x = torch.randn(3, 1, 6, 6)
    logits = predict(model, store, x, probabilities=False, chunk=2)
    for s, mu in enumerate(means):
        with torch.no_grad():
            model[0].weight_mu.copy_(mu)
            for m in model:
                if isinstance(m, BayesLayer):
                    m.freeze()
            torch.testing.assert_close(logits[s], model(x), atol=1e-5, rtol=1e-5)
            for m in model:
                if isinstance(m, BayesLayer):
                    m.unfreeze()


def test_exported_from_the_package():
    assert mtbkd.BayesConv2d is BayesConv2d and "BayesConv3d" in mtbkd.__all__
    assert mtbkd.nn.CONVERTIBLE[nn.Conv1d] is BayesConv1d


class _SubConv(nn.Conv2d):
    pass


@pytest.mark.parametrize("module, shown", [
    (nn.LazyConv2d(4, 3), "LazyConv2d"),
    (nn.ConvTranspose2d(2, 4, 3), "ConvTranspose2d"),
    (_SubConv(2, 4, 3), "_SubConv"),
    (weight_norm(nn.Conv2d(2, 4, 3)), "ParametrizedConv2d"),
    (nn.Sequential(nn.Conv2d(2, 4, 3)), "Sequential"),
])  # fmt: skip
def test_include_matching_only_unconvertible_modules_says_what_it_matched(module, shown):
    # audit (thirty-first session): "matches no nn.Linear or ... module" for a pattern that does
    # match module '0', a container or a type bayesify does not convert
    with pytest.raises(ValueError, match=f"it matches {shown}, which bayesify does not convert.*"
                       "'name.\\*'"):  # fmt: skip
        bayesify(nn.Sequential(module), include="0")
    with pytest.raises(ValueError, match="it matches LazyConv2d, which bayesify does not"):
        bayesify(nn.LazyConv2d(4, 3), include="")
    # the container's layers, by the suggested pattern
    model = bayesify(nn.Sequential(nn.Sequential(nn.Conv2d(2, 4, 3))), include="0.*")
    assert type(model[0][0]) is BayesConv2d


@pytest.mark.parametrize("kernel_size", [0, (3, 0)])
def test_zero_size_kernel_is_refused_by_name(kernel_size):
    # audit: nn.Conv2d builds an empty kernel; the Bayesian layer's init divided by fan_in = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's warning about initialising an empty tensor
        with pytest.raises(ValueError, match="kernel_size must be positive in every dimension"):
            BayesConv2d(4, 6, kernel_size)
        with pytest.raises(ValueError, match="kernel_size must be positive"):
            bayesify(nn.Sequential(nn.Conv2d(4, 6, kernel_size)))


def test_convertible_is_read_only_and_a_complex_dtype_is_refused():
    with pytest.raises(TypeError):
        mtbkd.nn.CONVERTIBLE[_SubConv] = BayesConv2d
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        BayesConv2d(2, 2, 1, dtype=torch.complex64)
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        BayesLinear(2, 2, dtype=torch.int64)


def test_a_weight_tied_to_the_root_module_is_named_so():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3, 3)
            self.w = self.head.weight

    with pytest.raises(ValueError, match="'head' shares a parameter with the model itself"):
        bayesify(Tied())


def test_torch_func_grad_through_sampling_layers_and_their_kl():
    # audit (thirty-first session): torch.func.grad over functional_call of a "reparameterize"
    # layer failed inside torch ("autograd.Function ... must override setup_context"): the fused
    # ops have no functorch rule; there the layers now sample and take the KL in torch ops
    from torch.func import functional_call, grad

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = BayesConv2d(2, 3, 3, padding=1, posterior_rho_init=-1.0)
            self.l = BayesLinear(48, 2, posterior_rho_init=-1.0, prior_mu=0.1, prior_sigma=0.5)

        def forward(self, x):
            return self.l(self.c(x).flatten(1)).square().sum() + kl_divergence(self) / 100

    torch.manual_seed(0)
    net = Net().double()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    params = {k: v.detach() for k, v in net.named_parameters()}
    torch.manual_seed(3)
    g = grad(lambda p: functional_call(net, p, (x,)))(params)
    torch.manual_seed(3)
    expected = torch.autograd.grad(net(x), list(net.parameters()))
    for (name, a), b in zip(g.items(), expected):
        # the same samples: the reference stream and the kernel's differ by float32 rounding
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5, msg=name)


@pytest.mark.parametrize("strict", [True, False])
def test_sampling_layers_export_and_draw_like_eager(strict):
    # session 32: the seed's draw is a node of the exported graph (it was read on the host, and
    # export failed on it): each call of the program samples afresh, and under one
    # torch.manual_seed it draws eager's very samples
    for layer, x in (
        (BayesLinear(3, 2, posterior_rho_init=-1.0), torch.randn(5, 3)),
        (BayesConv2d(2, 3, 3, padding=1, posterior_rho_init=-1.0), torch.randn(2, 2, 5, 5)),
    ):
        program = torch.export.export(layer, (x,), strict=strict).module()
        torch.manual_seed(3)
        first, second = program(x), program(x)
        torch.manual_seed(3)
        assert torch.equal(first, layer(x)) and torch.equal(second, layer(x))
        assert not torch.equal(first, second)


def test_frozen_and_local_layers_export():
    # docs/API.md: torch.export takes frozen and local-mode layers too
    x = torch.randn(1, 2, 5, 5)
    for layer in (BayesConv2d(2, 3, 3, mode="local"), BayesConv2d(2, 3, 3).freeze()):
        exported = torch.export.export(layer, (x,))
        assert exported.module()(x).shape == (1, 3, 3, 3)
    frozen = BayesConv2d(2, 3, 3).freeze()
    torch.testing.assert_close(torch.export.export(frozen, (x,)).module()(x), frozen(x))
