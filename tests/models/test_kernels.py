"""Kernels: closed forms on hand-computed pairs, PSD Gram matrices, the MGGP construction."""

from __future__ import annotations

import math

import pytest
import torch

import sf_mlflow  # noqa: F401  (flush-denormal setting)
from sf_mlflow.errors import ModelError
from sf_mlflow.models.kernels import KERNELS, make_kernel, squared_distances

NAMES = list(KERNELS)
F64 = torch.float64

# Two pairs at distances r = 5 ((0, 0)-(3, 4)) and r = 1 ((1, 1)-(1, 2)); lengthscale 2,
# sigma 1.5 (sigma^2 = 2.25). Values written out from the formulas:
#   Matern12: 2.25 exp(-r/2)                          r=5: 2.25 e^-2.5
#   Matern32: 2.25 (1 + t) e^-t,  t = sqrt(3) r / 2   r=5: t = 4.3301
#   Matern52: 2.25 (1 + t + t^2/3) e^-t, t = sqrt(5) r / 2
#   RBF:      2.25 exp(-r^2 / 8)                      r=5: 2.25 e^-3.125
X1 = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64)
X2 = torch.tensor([[3.0, 4.0], [1.0, 2.0]], dtype=F64)
PLAIN = {
    "Matern12": (0.1846912469037723, 1.3646939843534251),
    "Matern32": (0.15789551946960026, 1.765997221404264),
    "Matern52": (0.1428979827351234, 1.8644605704407822),
    "RBF": (0.0988581006526667, 1.9856180308153397),
}
# Across groups with a = 10, nu = 1/11, p = 2: the plain profile at r sqrt(nu) times
# nu^((2 nu_m + p)/2): Matern12 nu^1.5, Matern32 nu^2.5, Matern52 nu^3.5, RBF nu^1.
# Pairs: r = 5 ((0,0)-(3,4)) and r = 0 ((1,1)-(1,1), same place, other group: 2.25 nu^e).
CROSS = {
    "Matern12": (0.029022292005962125, 0.06167277502726983),
    "Matern32": (0.0035032748929333234, 0.005606615911569986),
    "Matern52": (0.0003431680753691245, 0.0005096923555972714),
    "RBF": (0.15396099841746227, 0.20454545454545456),
}


def _random_points(n, seed=0, scale=6.0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, generator=g, dtype=F64) * scale, torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("name", NAMES)
def test_closed_form_on_hand_computed_pairs(name):
    k = make_kernel(name, 2.0, 1.5, dtype=F64)
    K = k(X1, X2)
    assert K.shape == (2, 2)
    assert K[0, 0].item() == pytest.approx(PLAIN[name][0], rel=1e-12)
    assert K[1, 1].item() == pytest.approx(PLAIN[name][1], rel=1e-12)
    # k(x, x) = sigma^2, and the diagonal helper agrees without building a matrix
    assert torch.allclose(torch.diagonal(k(X1, X1)), torch.full((2,), 2.25, dtype=F64))
    assert torch.equal(k.diag(X1), torch.full((2,), 2.25, dtype=F64))


@pytest.mark.parametrize("name", NAMES)
def test_mggp_cross_group_values(name):
    k = make_kernel(name, 2.0, 1.5, multigroup=True, group_diff_param=10.0, dtype=F64)
    x1 = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64)
    x2 = torch.tensor([[3.0, 4.0], [1.0, 1.0]], dtype=F64)
    K = k(x1, x2, torch.tensor([0, 0]), torch.tensor([1, 2]))
    assert K[0, 0].item() == pytest.approx(CROSS[name][0], rel=1e-12)
    assert K[1, 1].item() == pytest.approx(CROSS[name][1], rel=1e-12)
    # the same pairs within one group are the plain kernel
    Ks = k(X1, X2, torch.tensor([1, 1]), torch.tensor([1, 1]))
    assert Ks[0, 0].item() == pytest.approx(PLAIN[name][0], rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_mggp_with_one_group_is_exactly_the_plain_kernel(name, dtype):
    x, _ = _random_points(40)
    x = x.to(dtype)
    plain = make_kernel(name, 1.3, 0.7, dtype=dtype)
    multi = make_kernel(name, 1.3, 0.7, multigroup=True, group_diff_param=10.0, dtype=dtype)
    g = torch.full((40,), 2)
    assert torch.equal(plain(x, x[:25]), multi(x, x[:25], g, g[:25]))
    # and with group_diff_param = 0 all groups are one
    flat = make_kernel(name, 1.3, 0.7, multigroup=True, group_diff_param=0.0, dtype=dtype)
    _, groups = _random_points(40)
    assert torch.equal(plain(x, x), flat(x, x, groups, groups))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("multigroup", [False, True])
def test_gram_matrices_are_psd(name, multigroup):
    x, g = _random_points(80, seed=1)
    k = make_kernel(name, 1.5, 1.2, multigroup=multigroup, group_diff_param=3.0, dtype=F64)
    K = k(x, x, g, g)
    assert torch.equal(K, K.T)
    eig = torch.linalg.eigvalsh(K)
    assert eig.min().item() >= -1e-10 * eig.max().item()
    # MGGP: covariance across groups never exceeds its value at r = 0, sigma^2 nu^e
    if multigroup:
        cross = g[:, None] != g[None, :]
        bound = 1.2 ** 2 * (1.0 / 4.0) ** k.mggp_exponent(2)
        assert K[cross].max().item() <= bound * (1 + 1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_per_factor_lengthscales_batch_the_matrices(name):
    x, g = _random_points(30, seed=2)
    ls = [0.5, 1.0, 3.0]
    k = make_kernel(name, ls, 1.1, n_components=3, multigroup=True, group_diff_param=2.0, dtype=F64)
    K = k(x, x[:7], g, g[:7])
    assert K.shape == (3, 30, 7)
    for l, value in enumerate(ls):
        single = make_kernel(name, value, 1.1, multigroup=True, group_diff_param=2.0, dtype=F64)
        assert torch.allclose(K[l], single(x, x[:7], g, g[:7]), rtol=1e-14, atol=0)
    assert k.diag(x).shape == (3, 30)      # one amplitude per factor


@pytest.mark.parametrize("name", NAMES)
def test_hyperparameter_gradients_are_finite_and_correct(name):
    # includes r = 0 pairs (x with itself), where sqrt(r^2) has an infinite slope
    x, g = _random_points(6, seed=3)
    k = make_kernel(name, 1.4, 0.9, multigroup=True, trainable=True, dtype=F64)

    def gram(raw_ls, raw_sigma):
        return torch.func.functional_call(k, {"raw_lengthscale": raw_ls, "raw_sigma": raw_sigma},
                                          (x, x, g, g))

    params = (k.raw_lengthscale.detach().clone().requires_grad_(),
              k.raw_sigma.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(gram, params)
    gram(*params).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in params)


def test_fixed_hyperparameters_do_not_require_grad():
    k = make_kernel("Matern32", 2.0, 1.0)
    assert not k.raw_lengthscale.requires_grad and not k.raw_sigma.requires_grad
    assert float(k.lengthscale) == pytest.approx(2.0) and float(k.sigma) == pytest.approx(1.0)
    assert k.mggp_exponent(2) == 2.5 and make_kernel("RBF").mggp_exponent(2) == 1.0


def test_squared_distances_are_exact_far_from_the_origin():
    # |x|^2 + |x'|^2 - 2 x.x' in float32 loses all digits here; direct differences do not.
    x1 = torch.tensor([[1000.0, 1000.0]])
    x2 = torch.tensor([[1000.5, 1000.0], [1000.0, 1000.25]])
    assert squared_distances(x1, x2).tolist() == [[0.25, 0.0625]]


def test_bad_arguments_raise_model_errors():
    with pytest.raises(ModelError, match="kernel = 'Matern72'.*Matern32"):
        make_kernel("Matern72")
    with pytest.raises(ModelError, match="lengthscale = -1.0"):
        make_kernel("RBF", -1.0)
    with pytest.raises(ModelError, match="sigma = 0"):
        make_kernel("RBF", 1.0, 0)
    with pytest.raises(ModelError, match="lengthscale has 2 values, expected 1 or n_components = 3"):
        make_kernel("RBF", [1.0, 2.0], n_components=3)
    with pytest.raises(ModelError, match="group codes"):
        make_kernel("RBF", multigroup=True)(X1, X2)
    assert make_kernel("matern32").__class__.__name__ == "Matern32"


def test_matern32_limit_of_small_distance():
    # k(r) = s2 (1 + t) e^-t = s2 (1 - t^2/2 + O(t^3)): check the expansion at r = 1e-3
    k = make_kernel("Matern32", 1.0, 1.0, dtype=F64)
    r = 1e-3
    K = k(torch.zeros(1, 2, dtype=F64), torch.tensor([[r, 0.0]], dtype=F64))
    t = math.sqrt(3.0) * r
    assert K.item() == pytest.approx(1.0 - t * t / 2.0, abs=1e-8)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("per_factor", [False, True])
def test_within_and_across_are_the_two_values_forward_picks_from(name, per_factor):
    x1, g1 = _random_points(13, seed=3)
    x2, g2 = _random_points(9, seed=4)
    kw = dict(lengthscale=[1.5, 3.0] if per_factor else 2.0, sigma=1.5, dtype=F64,
              n_components=2 if per_factor else None)
    k = make_kernel(name, multigroup=True, group_diff_param=10.0, **kw)
    within, across = k.within_and_across(x1, x2)
    same = (g1[:, None] == g2[None, :])
    assert torch.equal(k(x1, x2, g1, g2), torch.where(same, within, across))
    assert torch.equal(within, make_kernel(name, **kw)(x1, x2))
    with pytest.raises(ModelError, match="multi-group"):
        make_kernel(name).within_and_across(x1, x2)
