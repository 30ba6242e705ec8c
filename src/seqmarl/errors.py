"""Errors meant for the user: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (config key, option value, env name, missing extra)."""


class MissingExtraError(UserError):
    """A simulator's Python package is not installed."""

    def __init__(self, simulator: str, extra: str, cause: BaseException | None = None):
        detail = f" ({cause})" if cause is not None else ""
        super().__init__(
            f"{simulator} is not installed{detail}; install it with: pip install 'seqmarl[{extra}]'"
        )


class TrainingFault(Exception):
    """The run cannot go on (a NaN/inf in losses or gradients, a simulator that keeps failing): the CLI
    prints the diagnosis as one line and exits with code 3; checkpoints already on disk are left as they
    are."""


class EnvContractError(TrainingFault):
    """An env returned something the model cannot take (a wrong shape or dtype, a NaN/inf observation, an
    alive agent with no available action); raised by the guard in seqmarl/envs/guard.py."""
