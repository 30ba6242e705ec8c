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
