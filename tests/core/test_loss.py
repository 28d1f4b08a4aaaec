"""kto_loss against a float64 re-implementation written from the paper's formula."""

import math

import pytest
import torch

from trl_kto_ext import kto_loss
from trl_kto_ext.loss import apo_zero_unpaired_loss


def reference_kto(policy, reference, kl_policy, kl_reference, labels, beta, lam_d, lam_u):
    """Straight from the formula, in Python floats (float64), one example at a time."""
    kl_terms = [p - r for p, r in zip(kl_policy, kl_reference)]
    z0_raw = sum(kl_terms) / len(kl_terms) if kl_terms else 0.0
    z0 = max(0.0, z0_raw)
    losses = []
    for p, r, desirable in zip(policy, reference, labels):
        reward = p - r
        if desirable:
            value = lam_d / (1.0 + math.exp(-beta * (reward - z0)))
            losses.append(lam_d - value)
        else:
            value = lam_u / (1.0 + math.exp(-beta * (z0 - reward)))
            losses.append(lam_u - value)
    return sum(losses) / len(losses), z0, z0_raw


def random_inputs(b, k, seed, scale=5.0, kl_shift=0.0, labels=None):
    g = torch.Generator().manual_seed(seed)
    policy = torch.randn(b, generator=g, dtype=torch.float64) * scale - 20
    reference = torch.randn(b, generator=g, dtype=torch.float64) * scale - 20
    kl_policy = torch.randn(k, generator=g, dtype=torch.float64) * scale - 20 + kl_shift
    kl_reference = torch.randn(k, generator=g, dtype=torch.float64) * scale - 20
    if labels is None:
        labels = torch.rand(b, generator=g) < 0.5
    return policy, reference, kl_policy, kl_reference, labels


CASES = [
    # (B, K, scale, kl_shift, labels, beta, lambda_D, lambda_U)
    (1, 1, 5.0, 0.0, None, 0.1, 1.0, 1.0),
    (3, 3, 5.0, 3.0, None, 0.1, 1.33, 1.0),
    (7, 5, 5.0, -3.0, None, 0.5, 1.0, 1.2),  # z0 < 0: clamped to 0
    (8, 8, 500.0, 0.0, None, 0.1, 2.0, 1.0),  # large |r|: saturated sigmoids
    (5, 5, 5.0, 1.0, "all_desirable", 0.1, 4.0, 1.0),
    (4, 4, 5.0, 1.0, "all_undesirable", 0.1, 1.0, 1.0),
    (6, 0, 5.0, 0.0, None, 0.2, 1.0, 1.0),  # no KL rows: z0 = 0
    (33, 17, 2.0, 0.5, None, 1.0, 1.1, 0.9),
]


@pytest.mark.parametrize("b,k,scale,kl_shift,labels,beta,lam_d,lam_u", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_float64_reference(b, k, scale, kl_shift, labels, beta, lam_d, lam_u, dtype):
    fixed = {"all_desirable": torch.ones(b, dtype=torch.bool), "all_undesirable": torch.zeros(b, dtype=torch.bool)}
    inputs = random_inputs(b, k, seed=b * 31 + k, scale=scale, kl_shift=kl_shift, labels=fixed.get(labels))
    expected, z0, z0_raw = reference_kto(*(t.tolist() for t in inputs), beta, lam_d, lam_u)
    cast = [t.to(dtype) for t in inputs[:4]] + [inputs[4]]
    loss, metrics = kto_loss(*cast, beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected, rel=tol, abs=tol)
    assert metrics.kl.item() == pytest.approx(z0, rel=tol, abs=tol * 100)
    assert metrics.kl_raw.item() == pytest.approx(z0_raw, rel=tol, abs=tol * 100)
    expected_rewards = [beta * (p - r) for p, r in zip(inputs[0].tolist(), inputs[1].tolist())]
    assert metrics.rewards.tolist() == pytest.approx(expected_rewards, rel=1e-5, abs=1e-6)


def test_clamp_and_detach_of_reference_point():
    policy, reference, kl_policy, kl_reference, labels = random_inputs(6, 6, seed=0, kl_shift=-4.0)
    kl_policy.requires_grad_(True)
    loss, metrics = kto_loss(policy.requires_grad_(True), reference, kl_policy, kl_reference, labels)
    assert metrics.kl_raw.item() < 0 and metrics.kl.item() == 0.0
    loss.backward()
    assert kl_policy.grad is None, "z0 must be detached: no gradient may reach the KL log-probs"
    assert policy.grad is not None and torch.isfinite(policy.grad).all()


def test_gradients_match_finite_differences():
    policy, reference, kl_policy, kl_reference, labels = random_inputs(5, 5, seed=3, scale=20.0, kl_shift=2.0)
    policy = policy.clone().requires_grad_(True)

    def f(p):
        return kto_loss(p, reference, kl_policy, kl_reference, labels, beta=0.3, desirable_weight=1.3)[0]

    assert torch.autograd.gradcheck(f, (policy,), eps=1e-6, atol=1e-8)
    # And against the float64 reference by central differences, one coordinate at a time.
    loss = f(policy)
    (grad,) = torch.autograd.grad(loss, policy)
    h = 1e-5
    for i in range(5):
        up, down = policy.detach().tolist(), policy.detach().tolist()
        up[i] += h
        down[i] -= h
        args = (kl_policy.tolist(), kl_reference.tolist(), labels.tolist(), 0.3, 1.3, 1.0)
        numeric = reference_kto(up, reference.tolist(), *args)[0] - reference_kto(down, reference.tolist(), *args)[0]
        assert grad[i].item() == pytest.approx(numeric / (2 * h), rel=1e-6, abs=1e-10)


def test_one_class_batch_has_no_nan_and_gradients():
    policy, reference, kl_policy, kl_reference, _ = random_inputs(4, 4, seed=1)
    for value in (True, False):
        labels = torch.full((4,), value)
        p = policy.clone().requires_grad_(True)
        loss, _ = kto_loss(p, reference, kl_policy, kl_reference, labels)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(p.grad).all()


def test_reference_point_override_is_used_and_clamped():
    policy, reference, kl_policy, kl_reference, labels = random_inputs(4, 4, seed=2)
    _, metrics = kto_loss(policy, reference, kl_policy, kl_reference, labels, reference_point=torch.tensor(0.7))
    assert metrics.kl.item() == pytest.approx(0.7) and metrics.kl_raw.item() == pytest.approx(0.7)
    _, metrics = kto_loss(policy, reference, kl_policy, kl_reference, labels, reference_point=torch.tensor(-0.7))
    assert metrics.kl.item() == 0.0 and metrics.kl_raw.item() == pytest.approx(-0.7)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="same shape"):
        kto_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty batch"):
        kto_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.ones(0, dtype=torch.bool))


def test_apo_zero_unpaired_matches_formula():
    policy, reference, _, _, labels = random_inputs(9, 0, seed=4)
    loss, _ = apo_zero_unpaired_loss(policy, reference, labels, beta=0.2, desirable_weight=1.5)
    expected = []
    for p, r, desirable in zip(policy.tolist(), reference.tolist(), labels.tolist()):
        s = 1.0 / (1.0 + math.exp(-0.2 * (p - r)))
        expected.append(1.5 * (1 - s) if desirable else s)
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-12)
