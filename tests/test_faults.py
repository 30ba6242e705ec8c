"""NaN/inf injection: the run stops with a diagnosis naming the tensor and the step, exits with code 3
from the CLI, and leaves the last good checkpoint loadable. What a simulator returns is judged by the env
guard at the step it appears (seqmarl/envs/guard.py; more in tests/test_env_guard.py); losses and
gradient norms by the trainer's check_finite."""

import pytest

import seqmarl.envs.smax as smax_module
import seqmarl.train as train_module
from seqmarl.checkpoint import load_checkpoint
from seqmarl.cli import main


class PoisonAfter:
    """Wraps a vector env: from step call `after` on, one field of the record is NaN."""

    def __init__(self, envs, after: int, field: str):
        self.envs, self.after, self.field, self.calls = envs, after, field, 0
        self.spec, self.num_envs = envs.spec, envs.num_envs

    def reset(self, seed):
        return self.envs.reset(seed)

    def step(self, actions):
        record = self.envs.step(actions)
        self.calls += 1
        if self.calls >= self.after:
            getattr(record, self.field)[0].fill_(float("nan"))
        return record

    def close(self):
        self.envs.close()

    def get_state(self):  # checkpoints save the simulator's state (exact resume)
        return self.envs.get_state()

    def set_state(self, state):
        self.envs.set_state(state)


@pytest.mark.parametrize("field, named", [("obs", "obs (env 0, agent 0)"), ("reward", "reward (env 0)")])
def test_nan_stops_the_run_with_a_diagnosis_and_keeps_the_last_good_checkpoint(
    field, named, tmp_path, monkeypatch, capsys
):
    made = []
    adapter = smax_module.make_vector_env

    def poisoned(task, num_envs, seed):  # the simulator itself returns the NaN, inside the guard
        envs = adapter(task, num_envs=num_envs, seed=seed)
        if not made:  # the training envs (made first); evaluation envs stay clean
            envs = PoisonAfter(envs, after=3 * 10 + 5, field=field)  # inside the 4th iteration
        made.append(envs)
        return envs

    monkeypatch.setattr(smax_module, "make_vector_env", poisoned)
    argv = ["train", "--env", "smax:3m", "--steps", "400", "--num-envs", "2", "--out-dir", str(tmp_path)]
    argv += ["--run-name", "nan", "--no-progress", "--set", "ppo.rollout_length=10", "--set", "ppo.epochs=1"]
    argv += ["--set", "run.checkpoint_every=20", "--set", "run.eval_every=0", "--set", "env.eval_envs=2"]
    argv += ["--set", "run.eval_episodes=2", "--set", "run.tensorboard=false"]
    assert main(argv) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"smax:3m returned non-finite {named} at env step 70" in err, err  # the 35th step of 2 envs
    assert "last good checkpoint" in err and "step_000000000060.pt" in err, err
    # 3 iterations x 2 envs x 10 steps = 60 steps were good; checkpoints every 20 steps up to 60
    payload = load_checkpoint(tmp_path / "nan")
    assert payload["step"] == 60


def test_non_finite_loss_or_gradient_is_named():
    from seqmarl.errors import TrainingFault

    train_module.check_finite(
        {"losses/policy_loss": 0.1, "losses/grad_norm": 2.0}, 3200, train_module.Path(".")
    )
    with pytest.raises(TrainingFault, match=r"non-finite losses/grad_norm .* env step 3,200"):
        train_module.check_finite({"losses/grad_norm": float("inf")}, 3200, train_module.Path("/nonexistent"))
