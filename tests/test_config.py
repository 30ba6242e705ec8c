"""Config validation: typos and bad values name the key, presets load."""

import pytest

from seqmarl.config import build_config, parse_assignment, preset_for
from seqmarl.errors import UserError


def test_defaults_and_overrides_are_typed():
    config = build_config(
        {"ppo": {"lr": "1e-4", "epochs": "5", "value_norm": "false"}, "run": {"total_steps": 2e5}}
    )
    assert config.ppo.lr == 1e-4 and config.ppo.epochs == 5 and config.ppo.value_norm is False
    assert config.run.total_steps == 200000 and isinstance(config.run.total_steps, int)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"ppo": {"lrr": 1}}, "unknown config key ppo.lrr; allowed: lr,"),
        ({"optim": {}}, "unknown config section 'optim'"),
        ({"ppo": {"epochs": "many"}}, "ppo.epochs: expected int"),
        ({"ppo": {"epochs": 0}}, "ppo.epochs must be >= 1"),
        ({"ppo": {"clip": 1.5}}, "ppo.clip must be in (0, 1)"),
        ({"ppo": {"lr_schedule": "cosine"}}, "ppo.lr_schedule must be"),
        ({"run": {"progress": "maybe"}}, "run.progress: expected true/false"),
        ({"model": "big"}, "must be a mapping"),
        ({"qmix": {"buffer_size": 10, "batch_size": 20}}, "qmix.buffer_size must be >= qmix.batch_size"),
        ({"qmix": {"epsilon_finish": 0.5, "epsilon_start": 0.1}}, "epsilon_finish <= epsilon_start"),
    ],
)
def test_bad_overrides_name_the_key(overrides, fragment):
    with pytest.raises(UserError) as info:
        build_config(overrides)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_parse_assignment():
    assert parse_assignment("ppo.lr=3e-4") == {"ppo": {"lr": "3e-4"}}
    with pytest.raises(UserError):
        parse_assignment("lr=3e-4")


def test_presets_follow_the_reference_settings():
    smax = build_config(preset_for("smax:3m"))
    assert (smax.ppo.lr, smax.ppo.epochs, smax.ppo.clip, smax.env.num_envs) == (5e-4, 15, 0.05, 32)
    assert smax.run.total_steps == 1_000_000
    cheetah = build_config(preset_for("mamujoco:HalfCheetah-6x1"))
    assert (cheetah.env.num_envs, cheetah.ppo.num_minibatches, cheetah.ppo.max_grad_norm) == (40, 4, 0.5)
    assert preset_for("smax:not_a_map_with_entries")["ppo"]["lr"] == 5e-4  # family defaults still apply


def test_qmix_preset_follows_pymarl2():
    qmix = build_config(preset_for("smax:3m", "qmix")).qmix
    assert (qmix.lr, qmix.td_lambda, qmix.buffer_size, qmix.batch_size) == (1e-3, 0.6, 5000, 128)
    assert (qmix.epsilon_finish, qmix.epsilon_anneal_steps, qmix.target_update_interval) == (
        0.05,
        100_000,
        25,
    )
