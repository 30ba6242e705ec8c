"""The env guard (seqmarl/envs/guard.py) on the real simulators: a simulator that raises is restarted and
its running episodes are discarded (not counted, truncated for the learner, replayed in evaluation); one
that keeps raising stops the run with exit code 3; records that break the contract are refused, naming
the field. Faults come from a test-only injector wrapped around the real adapter.
"""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch

import seqmarl.envs.mamujoco as mamujoco_module
from seqmarl.algos import make_algorithm
from seqmarl.buffer import RolloutBuffer
from seqmarl.cli import main
from seqmarl.config import build_config
from seqmarl.envs.guard import GuardedVectorEnv, restart_seed
from seqmarl.envs.smax import SmaxVectorEnv
from seqmarl.errors import EnvContractError, TrainingFault
from seqmarl.evaluate import evaluate
from seqmarl.rollout import EpisodeStats, collect
from seqmarl.types import StepRecord

CPU = torch.device("cpu")
E = 2
SMAX_LIMIT = 10  # SMAX max_steps: an undecided 3m battle lasts 11 steps


class Faults:
    """What goes wrong, shared by every simulator one factory builds (step calls count across restarts).

    fail_at: step calls (1-based) that raise; always: every step call raises; edit(record) -> record is
    applied to every record from step call `edit_from` on (0: the reset records too).
    """

    def __init__(self, fail_at=(), always=False, edit=None, edit_from=1, fail_resets=()):
        self.fail_at, self.always, self.edit, self.edit_from = set(fail_at), always, edit, edit_from
        self.fail_resets = set(fail_resets)  # reset calls (1-based) that raise
        self.calls = self.resets = 0

    def apply(self, record: StepRecord) -> StepRecord:
        return self.edit(record) if self.edit is not None and self.calls >= self.edit_from else record


class FaultInjector:
    """Test-only VectorEnv around a real adapter that fails as `faults` says."""

    def __init__(self, envs, faults: Faults):
        self.envs, self.faults = envs, faults
        self.spec, self.num_envs = envs.spec, envs.num_envs

    def reset(self, seed):
        self.faults.resets += 1
        if self.faults.resets in self.faults.fail_resets:
            raise RuntimeError(f"injected simulator failure at reset call {self.faults.resets}")
        return self.faults.apply(self.envs.reset(seed))

    def step(self, actions):
        self.faults.calls += 1
        if self.faults.always or self.faults.calls in self.faults.fail_at:
            raise RuntimeError(f"injected simulator failure at step call {self.faults.calls}")
        return self.faults.apply(self.envs.step(actions))

    def close(self):
        self.envs.close()

    def get_state(self):  # checkpoints save the simulator's state (exact resume)
        return self.envs.get_state()

    def set_state(self, state):
        self.envs.set_state(state)


@pytest.fixture(scope="module")
def smax() -> SmaxVectorEnv:
    return SmaxVectorEnv("3m", num_envs=E, seed=0, max_steps=SMAX_LIMIT)


def smax_guard(simulator: SmaxVectorEnv, faults: Faults, seed: int = 0) -> GuardedVectorEnv:
    # A "rebuild" re-seeds the one compiled SMAX simulator instead of compiling a new one (~14 s each);
    # the guard's side (close, factory, reset, discard) is the same. test_cli_* below rebuild for real.
    return GuardedVectorEnv(lambda seed: FaultInjector(simulator, faults), seed)


def first_actions(record: StepRecord) -> torch.Tensor:
    return record.action_mask.float().argmax(-1)  # (E, N) the first available action of every agent


def warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("seqmarl: warning: simulator")]


def test_a_failed_step_restarts_the_simulator_and_discards_its_episodes(smax, capsys):
    guard = smax_guard(smax, Faults(fail_at={4}))
    record = guard.reset(seed=1)
    stats = EpisodeStats()
    for _ in range(3):
        record = guard.step(first_actions(record))
        stats.add(record)
    before = record
    record = guard.step(first_actions(record))  # raises inside; the guard restarts
    stats.add(record)

    (warning,) = warnings(capsys.readouterr().err)
    assert "smax:3m raised RuntimeError: injected simulator failure at step call 4" in warning
    assert "(restart 1); its 2 running episodes are discarded" in warning and guard.restarts == 1
    assert record.discarded.all() and record.truncated.all() and not record.terminated.any()
    assert not record.reward.any() and not record.won.any()
    # bootstrap from the observation the failed actions were taken at; obs starts the new episodes
    assert torch.equal(record.final_obs, before.obs) and torch.equal(record.final_state, before.state)
    assert torch.equal(record.final_alive, before.alive)
    assert stats.returns == [] and stats.discarded == E
    assert stats.summary("charts", has_win=True) == {"charts/discarded_episodes": float(E)}

    # the new episodes are whole: each env finishes exactly one within the time limit, and only those count
    for _ in range(SMAX_LIMIT + 1):
        record = guard.step(first_actions(record))
        stats.add(record)
    assert len(stats.returns) == E and max(stats.lengths) <= SMAX_LIMIT + 1 and stats.discarded == E
    assert not warnings(capsys.readouterr().err)
    # the rebuilt simulator started from the seed derived from (seed, restart count)
    assert restart_seed(0, 1) != restart_seed(0, 2) and restart_seed(0, 1) == restart_seed(0, 1)


def test_evaluation_replays_a_discarded_episode(smax, capsys):
    config = build_config({"algo": "mappo"})
    torch.manual_seed(0)
    algorithm = make_algorithm("mappo", smax.spec, config, CPU)
    guard = smax_guard(smax, Faults(fail_at={5}))
    stats = evaluate(guard, algorithm, episodes=3, seed=0, device=CPU)
    assert len(stats.returns) == 3 and stats.discarded == 0  # three real episodes, none cut short
    assert len(warnings(capsys.readouterr().err)) == 1 and guard.restarts == 1


def test_a_failed_reset_restarts_the_simulator_with_the_same_seed(smax, capsys):
    guard = smax_guard(smax, Faults(fail_resets={2}))  # the guard's first reset works, the next raises
    record = guard.reset(seed=3)
    (warning,) = warnings(capsys.readouterr().err)
    assert "failure at reset call 2; restarting it (restart 1)" in warning and "discarded" not in warning
    assert not record.discarded.any() and torch.equal(record.obs, smax.reset(seed=3).obs)


def test_persistent_failure_stops_with_a_training_fault(smax, capsys):
    guard = smax_guard(smax, Faults(always=True))
    record = guard.reset(seed=0)
    for _ in range(3):  # each failed step is restarted and discards the episodes it was in
        record = guard.step(first_actions(record))
        assert record.discarded.all()
    with pytest.raises(TrainingFault, match=r"failed 4 times in a row .* giving up after 3 restarts"):
        guard.step(first_actions(record))
    assert len(warnings(capsys.readouterr().err)) == 3


def set_field(name, change):
    def edit(record: StepRecord) -> StepRecord:
        value = getattr(record, name).clone()
        return dataclasses.replace(record, **{name: change(value)})

    return edit


def _poison(index, value=float("nan")):
    def change(tensor):
        tensor[index] = value
        return tensor

    return change


BAD_RECORDS = {
    "wrong obs shape": (
        set_field("obs", lambda obs: obs[..., :-1]),
        r"smax:3m returned obs of shape \(2, 3, 74\) and dtype torch.float32; expected \(2, 3, 75\)",
    ),
    "wrong dtype": (
        set_field("episode_length", lambda length: length.int()),
        r"returned episode_length of shape \(2,\) and dtype torch.int32; expected \(2,\) and torch.int64",
    ),
    "no available action": (
        set_field("action_mask", _poison((1, 2), False)),
        r"smax:3m env 1: agent 2 is alive but has no available action \(action_mask all False\)",
    ),
    "NaN obs": (set_field("obs", _poison((1, 0, 3))), r"non-finite obs \(env 1, agent 0\) at env step 4"),
    "inf state": (set_field("state", _poison((0, 5), float("inf"))), r"non-finite state \(env 0\)"),
    "NaN reward": (set_field("reward", _poison(1)), r"non-finite reward \(env 1\)"),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_a_record_that_breaks_the_contract_is_refused(smax, case):
    edit, message = BAD_RECORDS[case]
    guard = smax_guard(smax, Faults(edit=edit, edit_from=2))
    record = guard.step(first_actions(guard.reset(seed=0)))
    with pytest.raises(EnvContractError, match=message):
        guard.step(first_actions(record))
    assert guard.restarts == 0  # a broken record is refused, not restarted


def test_the_first_record_after_reset_is_checked_too(smax):
    with pytest.raises(EnvContractError, match=r"returned state of shape \(2, 71\)"):
        smax_guard(smax, Faults(edit=set_field("state", lambda state: state[:, 1:]), edit_from=0))


def test_a_spec_without_sizes_and_a_wrong_action_shape_are_refused(smax):
    injector = FaultInjector(smax, Faults())
    injector.spec = dataclasses.replace(smax.spec, obs_dim=0)
    with pytest.raises(EnvContractError, match=r"smax:3m has obs_dim = 0; every size must be >= 1"):
        GuardedVectorEnv(lambda seed: injector, seed=0)
    guard = smax_guard(smax, Faults())
    with pytest.raises(ValueError, match=r"actions must have shape \(2, 3\), got \(2, 4\)"):
        guard.step(torch.zeros(E, 4, dtype=torch.long))
    assert guard.restarts == 0


def test_state_passes_through_with_the_restart_count(smax):
    class WithState(FaultInjector):
        def get_state(self):
            return {"calls": self.faults.calls}

        def set_state(self, state):
            self.faults.calls = state["calls"]

    faults = Faults(fail_at={2})
    guard = GuardedVectorEnv(lambda seed: WithState(smax, faults), seed=0)
    record = guard.step(first_actions(guard.reset(seed=0)))
    guard.step(first_actions(record))
    state = guard.get_state()
    assert state["restarts"] == 1 and state["inner"] == {"calls": 2} and state["steps"] == 2
    other = GuardedVectorEnv(lambda seed: WithState(smax, Faults()), seed=0)
    other.set_state(state)
    assert other.restarts == 1 and other.get_state()["inner"] == {"calls": 2}
    assert torch.equal(other.get_state()["last"]["obs"], state["last"]["obs"])

    class WithoutState(FaultInjector):
        get_state = None

    with pytest.raises(NotImplementedError, match="WithoutState has no get_state"):
        GuardedVectorEnv(lambda seed: WithoutState(smax, Faults()), seed=0).get_state()


def test_the_learner_sees_a_discarded_step_as_truncated():
    # MaMuJoCo, rebuilt for real through the adapter's factory.
    faults = Faults(fail_at={3})
    guard = GuardedVectorEnv(
        lambda seed: FaultInjector(mamujoco_module.make_vector_env("HalfCheetah-6x1", E, seed), faults), 0
    )
    config = build_config({"algo": "mat"})
    torch.manual_seed(0)
    algorithm = make_algorithm("mat", guard.spec, config, CPU)
    buffer = RolloutBuffer(guard.spec, 6, E, CPU)
    record, _, stats = collect(guard, algorithm, buffer, guard.reset(seed=0), None, CPU)
    discarded = 2  # the third step (t = 2) raised
    assert buffer.truncated[discarded].all() and not buffer.terminated.any()
    assert buffer.truncated.sum() == E  # HalfCheetah has no other episode end within 6 steps
    assert not buffer.rewards[discarded].any() and buffer.rewards[discarded + 1].all()
    assert torch.equal(buffer.final_obs[discarded], buffer.obs[discarded])  # bootstrap from the last good obs
    torch.testing.assert_close(buffer.final_values[discarded], buffer.values[discarded])
    assert stats.returns == [] and stats.discarded == E and guard.restarts == 1


def _cli_argv(tmp_path, steps: int) -> list[str]:
    argv = ["train", "--env", "mamujoco:HalfCheetah-6x1", "--steps", str(steps), "--num-envs", str(E)]
    argv += ["--out-dir", str(tmp_path), "--run-name", "faulty", "--no-progress"]
    for setting in (
        "ppo.rollout_length=10",
        "ppo.epochs=1",
        "ppo.num_minibatches=1",
        "env.eval_envs=1",
        "run.eval_episodes=1",
        "run.eval_every=0",
        "run.tensorboard=false",
        "run.threads=1",
    ):
        argv += ["--set", setting]
    return argv


def _inject_into_training_envs(monkeypatch, faults: Faults) -> None:
    real = mamujoco_module.make_vector_env

    def make_vector_env(task, num_envs, seed):
        envs = real(task, num_envs=num_envs, seed=seed)
        return FaultInjector(envs, faults) if num_envs == E else envs  # evaluation uses 1 env

    monkeypatch.setattr(mamujoco_module, "make_vector_env", make_vector_env)


def test_cli_training_goes_on_after_a_simulator_failure(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # MuJoCo writes MUJOCO_LOG.TXT into the working directory
    _inject_into_training_envs(monkeypatch, Faults(fail_at={13}))  # inside the second iteration
    assert main(_cli_argv(tmp_path, steps=60)) == 0
    (warning,) = warnings(capsys.readouterr().err)
    assert "mamujoco:HalfCheetah-6x1 raised RuntimeError: injected" in warning and "(restart 1)" in warning
    run_dir = tmp_path / "faulty"
    assert json.loads((run_dir / "result.json").read_text())["steps"] == 60
    with open(run_dir / "metrics.csv") as f:
        discarded = {int(row["step"]): row["charts/discarded_episodes"] for row in csv.DictReader(f)}
    assert discarded == {0: "", 20: "", 40: "2.0", 60: ""}


def test_cli_persistent_simulator_failure_exits_3_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _inject_into_training_envs(monkeypatch, Faults(always=True))
    assert main(_cli_argv(tmp_path, steps=60)) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("seqmarl:")]
    assert len(warnings("\n".join(err))) == 3 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith(
        "seqmarl: training stopped: simulator mamujoco:HalfCheetah-6x1 failed 4 times in a row"
    )
