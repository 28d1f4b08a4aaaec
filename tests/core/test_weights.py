"""Per-row weights: the weighted KTO loss against a float64 computation from the formula, its split over processes,
the data checks, the weighted loss aversion, the collator and the trainer."""

import math

import pytest
import torch
from conftest import cpu_args
from datasets import Dataset
from test_loss import random_inputs

from trl_kto_ext import KTOExtTrainer, kto_loss
from trl_kto_ext.data.unpairing import unpair_paired_dataset
from trl_kto_ext.data.weights import check_weights
from trl_kto_ext.loss import apo_zero_unpaired_loss
from trl_kto_ext.loss_aversion import resolve_loss_aversion, weight_masses
from trl_kto_ext.models.tiny import make_kto_dataset


def weighted_reference(policy, reference, kl_policy, kl_reference, labels, weights, beta, lam_d, lam_u):
    """sum_i w_i lambda_y (1 - v_i) / sum_i w_i in Python floats, z0 from the unweighted KL rows; and d loss / d p_i."""
    z0 = max(0.0, math.fsum(p - r for p, r in zip(kl_policy, kl_reference)) / len(kl_policy))
    total = math.fsum(weights)
    terms, grads = [], []
    for p, r, desirable, w in zip(policy, reference, labels, weights):
        lam, sign = (lam_d, 1.0) if desirable else (lam_u, -1.0)
        s = 1.0 / (1.0 + math.exp(-beta * sign * (p - r - z0)))
        terms.append(w * lam * (1.0 - s))
        grads.append(-w * lam * s * (1.0 - s) * beta * sign / total)  # d(lam (1 - sigma(beta sign x)))/dx
    return math.fsum(terms) / total, grads


def random_weights(b, seed, zeros=0):
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(b, generator=g, dtype=torch.float64) * 3
    weights[:zeros] = 0.0
    return weights


@pytest.mark.parametrize("b,k,zeros,beta,lam_d,lam_u", [(1, 1, 0, 0.1, 1.0, 1.0), (7, 5, 2, 0.5, 1.3, 1.0),
                                                        (16, 16, 0, 0.1, 2.0, 0.8), (9, 4, 8, 1.0, 1.0, 1.0)])  # fmt: skip
def test_weighted_loss_and_gradient_match_float64_formula(b, k, zeros, beta, lam_d, lam_u):
    policy, reference, kl_policy, kl_reference, labels = random_inputs(b, k, seed=b + 7 * k, kl_shift=1.0)
    weights = random_weights(b, seed=b, zeros=zeros)
    expected, grads = weighted_reference(
        policy.tolist(), reference.tolist(), kl_policy.tolist(), kl_reference.tolist(), labels.tolist(),
        weights.tolist(), beta, lam_d, lam_u,
    )  # fmt: skip
    policy.requires_grad_(True)
    loss, _ = kto_loss(policy, reference, kl_policy, kl_reference, labels, beta, lam_d, lam_u, weights=weights)
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    assert policy.grad.tolist() == pytest.approx(grads, rel=1e-10, abs=1e-14)


def test_equal_weights_give_the_plain_mean_and_one_hot_weights_pick_a_row():
    inputs = random_inputs(6, 6, seed=3, kl_shift=2.0)
    plain, metrics = kto_loss(*inputs)
    assert kto_loss(*inputs, weights=torch.full((6,), 2.5, dtype=torch.float64)).loss.item() == pytest.approx(
        plain.item(), rel=1e-14
    )
    for i in range(6):
        one_hot = torch.zeros(6, dtype=torch.float64)
        one_hot[i] = 4.0
        assert kto_loss(*inputs, weights=one_hot).loss.item() == pytest.approx(metrics.losses[i].item(), rel=1e-14)


def test_split_over_processes_averages_to_the_global_weighted_mean():
    """Each of P processes divides by (global sum of weights) / P: the mean of the P losses, and of their gradients
    (what DDP averages), is the global weighted mean and its gradient; the mean of per-process weighted means is not."""
    b, split = 9, 3
    policy, reference, kl_policy, kl_reference, labels = random_inputs(b, b, seed=11, kl_shift=1.0)
    weights = random_weights(b, seed=5)
    weights[split:] *= 4  # the second process holds most of the weight
    z0 = (kl_policy - kl_reference).mean()
    expected, grads = weighted_reference(policy.tolist(), reference.tolist(), kl_policy.tolist(),
                                         kl_reference.tolist(), labels.tolist(), weights.tolist(), 0.1, 1.0, 1.0)  # fmt: skip
    per_process_total = weights.sum() / 2
    losses, naive, grad = [], [], torch.zeros(b, dtype=torch.float64)
    for part in (slice(0, split), slice(split, b)):
        p = policy[part].clone().requires_grad_(True)
        args = (p, reference[part], kl_policy[:0], kl_reference[:0], labels[part])
        loss, _ = kto_loss(*args, reference_point=z0, weights=weights[part], weight_total=per_process_total)
        loss.backward()
        losses.append(loss.item())
        grad[part] = p.grad / 2  # DDP: the average over the two processes
        naive.append(kto_loss(*args, reference_point=z0, weights=weights[part]).loss.item())
    assert sum(losses) / 2 == pytest.approx(expected, rel=1e-12)
    assert grad.tolist() == pytest.approx(grads, rel=1e-10, abs=1e-14)
    assert not math.isclose(sum(naive) / 2, expected, rel_tol=1e-3)


def test_all_zero_weights_give_zero_loss_and_gradient():
    policy, *rest = random_inputs(4, 4, seed=1)
    policy.requires_grad_(True)
    loss, _ = kto_loss(policy, *rest, weights=torch.zeros(4, dtype=torch.float64))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(policy.grad, torch.zeros(4, dtype=torch.float64))


def test_weight_shape_error_is_one_clear_line():
    with pytest.raises(ValueError, match="weights.*one per row"):
        kto_loss(*random_inputs(4, 4, seed=1), weights=torch.ones(3))


def test_apo_zero_unpaired_takes_weights():
    policy, reference, _, _, labels = random_inputs(5, 0, seed=2)
    weights = random_weights(5, seed=2)
    beta = 0.2
    terms = [
        w * ((1 - 1 / (1 + math.exp(-beta * (p - r)))) if y else 1 / (1 + math.exp(-beta * (p - r))))
        for p, r, y, w in zip(policy.tolist(), reference.tolist(), labels.tolist(), weights.tolist())
    ]
    loss, _ = apo_zero_unpaired_loss(policy, reference, labels, beta=beta, weights=weights)
    assert loss.item() == pytest.approx(math.fsum(terms) / math.fsum(weights.tolist()), rel=1e-12)


# ------------------------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize(
    "value,problem",
    [(-0.5, "negative"), (float("nan"), "NaN"), (float("inf"), "infinite"), (None, "missing"), ("2", "not a number")],
)
def test_bad_weights_are_refused_naming_the_row(value, problem):
    with pytest.raises(ValueError, match=rf"weight at row 2 \(counting from 0\) of the train dataset .*{problem}"):
        check_weights([1.0, 0.5, value, 1.0], "train")


def test_a_class_whose_rows_all_weigh_zero_is_refused():
    with pytest.raises(ValueError, match=r"Every undesirable row .* weight 0 \(the first at row 1"):
        check_weights([1.0, 0.0, 2.0, 0.0], "train", [True, False, True, False])
    check_weights([1.0, 0.0, 2.0, 0.5], "train", [True, False, True, False])  # one positive weight is enough


def test_auto_loss_aversion_uses_the_weighted_class_mass():
    data = Dataset.from_dict({"prompt": ["a", "b", "c", "d"], "completion": ["x"] * 4,
                              "label": [True, False, False, False], "weight": [0.5, 1.0, 2.0, 0.25]})  # fmt: skip
    masses = weight_masses(data)
    assert masses == (0.5, 3.25)
    resolved = resolve_loss_aversion(1, 3, "auto", target=1.0, masses=masses)
    assert resolved.desirable_weight == pytest.approx(3.25 / 0.5) and resolved.ratio == pytest.approx(1.0)
    assert "weighted class mass W_D=0.5, W_U=3.25" in resolved.describe()
    assert "lambda_D*W_D/(lambda_U*W_U)=1" in resolved.describe()


def test_a_pair_weight_reaches_both_rows():
    pairs = Dataset.from_dict({"prompt": ["p1", "p2"], "chosen": ["a", "b"], "rejected": ["c", "d"],
                               "weight": [3.0, 0.5]})  # fmt: skip
    rows = unpair_paired_dataset(pairs, seed=None)
    assert list(zip(rows["prompt"], rows["label"], rows["weight"])) == [
        ("p1", True, 3.0), ("p1", False, 3.0), ("p2", True, 0.5), ("p2", False, 0.5)
    ]  # fmt: skip
    assert weight_masses(rows) == (3.5, 3.5) == weight_masses(pairs)


# ---------------------------------------------------------------------------------------------------------- trainer
@pytest.fixture
def weighted_trainer(tmp_path, small_model, tiny_tokenizer):
    data = make_kto_dataset(24, seed=4)
    data = data.add_column("weight", [float((i % 4) * 0.5) + (0.5 if i % 4 == 0 else 0.0) for i in range(24)])
    args = cpu_args(tmp_path, per_device_train_batch_size=6, max_steps=2, beta=0.5)
    trainer = KTOExtTrainer(model=small_model, args=args, train_dataset=data, processing_class=tiny_tokenizer)
    with torch.no_grad():  # a reference apart from the policy: z0 and the rewards are not all 0
        for i, parameter in enumerate(trainer.ref_model.parameters()):
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    return trainer, data


def test_trainer_loss_is_the_weighted_mean_of_its_rows(weighted_trainer):
    trainer, data = weighted_trainer
    rows = [trainer.train_dataset[i] for i in range(6)]
    batch = trainer.data_collator(rows)
    assert batch["weight"].tolist() == [data[i]["weight"] for i in range(6)]
    trainer.model.train()

    def loss_with(weights):
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, dict(batch, weight=torch.tensor(weights))).item()

    weights = batch["weight"].tolist()
    per_row = [loss_with([4.0 if j == i else 0.0 for j in range(6)]) for i in range(6)]  # one row each, same z0
    expected = math.fsum(w * r for w, r in zip(weights, per_row)) / math.fsum(weights)
    assert loss_with(weights) == pytest.approx(expected, rel=1e-5)
    assert loss_with([1.0] * 6) == pytest.approx(math.fsum(per_row) / 6, rel=1e-5)


def test_training_logs_the_weight_mean_per_class_and_the_weighted_lambda(weighted_trainer, capsys):
    trainer, data = weighted_trainer
    masses = weight_masses(data)
    assert trainer.desirable_weight == pytest.approx(masses[1] / masses[0])  # lambda_D = W_U / W_D (target 1)
    trainer.train()
    assert "from the weighted class mass" in capsys.readouterr().out
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all("weight/desirable_mean" in h or "weight/undesirable_mean" in h for h in logged)
    card = open(trainer.create_model_card()).read()
    assert "weighted class mass W_D" in card


def test_trainer_refuses_a_negative_weight_naming_the_row(tmp_path, small_model, tiny_tokenizer):
    data = make_kto_dataset(8, seed=4).add_column("weight", [1.0, 1.0, 1.0, -2.0, 1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"weight at row 3 \(counting from 0\) of the train dataset is -2.0"):
        KTOExtTrainer(model=small_model, args=cpu_args(tmp_path), train_dataset=data, processing_class=tiny_tokenizer)


def test_one_class_weighted_data_falls_back_like_unweighted_data():
    resolved = resolve_loss_aversion(3, 0, "auto", masses=(2.5, 0.0))
    assert resolved[:4] == (1.0, 1.0, 3, 0) and math.isnan(resolved.ratio)
    assert "weighted class mass W_D=2.5, W_U=0" in resolved.describe() and "only desirable rows" in resolved.describe()
    with pytest.raises(ValueError, match="Every undesirable training row has weight 0"):
        resolve_loss_aversion(3, 2, "auto", masses=(2.5, 0.0))
