"""Known answers for the PPO maths and the value normaliser."""

import numpy as np
import torch

from seqmarl.algos import ppo_losses
from seqmarl.normalize import RunningMeanStd


def test_clipped_surrogate_known_values():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 0.5, 1.05, 0.9]))
    adv = torch.tensor([1.0, -1.0, 2.0, 1.0])
    mask = torch.tensor([True, True, True, False])
    loss, diag = ppo_losses.clipped_surrogate(new, old, adv, clip=0.2, mask=mask)
    # min(r*A, clip(r)*A): 1.2, -0.8 (clip 0.8 * -1 = -0.8 vs -0.5 -> -0.8), 2.1; last token masked out
    expected = -(1.2 - 0.8 + 2.1) / 3
    assert abs(loss.item() - expected) < 1e-6
    assert abs(diag["clip_fraction"].item() - 2 / 3) < 1e-6


def test_huber_value_loss_has_gradient_on_both_sides():
    target = torch.zeros(2)
    value = torch.tensor([-50.0, 50.0], requires_grad=True)
    old = value.detach().clone()  # no clipping effect: value == old
    loss = ppo_losses.clipped_value_loss(
        value, old, target, clip=0.2, huber_delta=10.0, mask=torch.ones(2, dtype=bool)
    )
    loss.backward()
    # Huber with delta 10 is linear outside the threshold: |grad| = delta / n on BOTH sides.
    torch.testing.assert_close(value.grad, torch.tensor([-5.0, 5.0]))
    assert abs(loss.item() - 10 * (50 - 5)) < 1e-4


def test_value_clipping_takes_the_pessimistic_error():
    old = torch.tensor([0.0])
    value = torch.tensor([1.0])  # moved by 1, clipped to 0.2
    target = torch.tensor([1.0])
    loss = ppo_losses.clipped_value_loss(
        value, old, target, clip=0.2, huber_delta=None, mask=torch.ones(1, dtype=bool)
    )
    assert abs(loss.item() - 0.5 * 0.8**2) < 1e-6


def test_normalize_advantages_ignores_masked_entries():
    adv = torch.tensor([1.0, 3.0, 1000.0])
    out = ppo_losses.normalize_advantages(adv, torch.tensor([True, True, False]))
    torch.testing.assert_close(out[:2], torch.tensor([-1.0, 1.0]), atol=1e-6, rtol=0)


def test_running_mean_std_matches_numpy():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3.0, 2.0, size=n) for n in (5, 100, 1, 37)]
    rms = RunningMeanStd()
    for chunk in chunks:
        rms.update(torch.tensor(chunk, dtype=torch.float32))
    everything = np.concatenate(chunks)
    assert abs(rms.mean.item() - everything.mean()) < 1e-5
    assert abs(rms.var.item() - everything.var()) < 1e-4
    x = torch.tensor([1.0, 5.0])
    torch.testing.assert_close(rms.denormalize(rms.normalize(x)), x)


def test_happo_correction_is_the_product_of_earlier_agents_ratios():
    """Kuba et al. 2022: after agents i1..ik are updated, sample b's factor is prod_j pi_new/pi_old."""
    old_1, new_1 = torch.log(torch.tensor([0.5, 0.2, 0.4])), torch.log(torch.tensor([0.6, 0.1, 0.4]))
    old_2, new_2 = torch.log(torch.tensor([0.3, 0.3, 0.9])), torch.log(torch.tensor([0.6, 0.3, 0.45]))
    alive_1 = torch.tensor([True, True, True])
    alive_2 = torch.tensor([True, True, False])  # agent 2 is dead in sample 2: it changes nothing
    factor = torch.ones(3)
    factor = ppo_losses.happo_correction(factor, new_1, old_1, alive_1)
    torch.testing.assert_close(factor, torch.tensor([1.2, 0.5, 1.0]))
    factor = ppo_losses.happo_correction(factor, new_2, old_2, alive_2)
    torch.testing.assert_close(factor, torch.tensor([2.4, 0.5, 1.0]))


def test_weighted_surrogate_scales_each_token_by_its_factor():
    old = torch.zeros(3)
    new = torch.log(torch.tensor([1.5, 1.0, 0.9]))
    adv = torch.tensor([1.0, -2.0, 1.0])
    weight = torch.tensor([2.0, 0.5, 3.0])
    mask = torch.ones(3, dtype=torch.bool)
    loss, _ = ppo_losses.clipped_surrogate(new, old, adv, clip=0.2, mask=mask, weight=weight)
    # per token min(r*A, clip(r)*A): 1.2, -2.0, 0.9; weighted: 2.4, -1.0, 2.7
    assert abs(loss.item() - (-(2.4 - 1.0 + 2.7) / 3)) < 1e-6
