"""Property test: generated bad configs and CLI inputs each end with exactly one line on stderr and
exit code 2, never a traceback, and are refused before any environment or training starts."""

import contextlib
import dataclasses
import io
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqmarl.algos import algorithm_names
from seqmarl.cli import main
from seqmarl.config import SECTIONS, TrainConfig

WORD = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=12)
VALUE = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=12)
FIELDS = {
    name: {f.name: f.type for f in dataclasses.fields(getattr(TrainConfig(), name))} for name in SECTIONS
}
NUMERIC = [(s, k) for s, fields in FIELDS.items() for k, t in fields.items() if t in ("int", "float")]
# Values a field refuses however it is written (each field's own __post_init__ check).
OUT_OF_RANGE = [
    ("ppo.lr", st.floats(max_value=0.0, allow_nan=False)),
    (
        "ppo.clip",
        st.one_of(st.floats(max_value=0.0, allow_nan=False), st.floats(min_value=1.0, allow_nan=False)),
    ),
    ("ppo.epochs", st.integers(max_value=0)),
    ("ppo.num_minibatches", st.integers(max_value=0)),
    ("ppo.rollout_length", st.integers(max_value=0)),
    ("ppo.gamma", st.floats(min_value=1.001, max_value=1e6)),
    ("run.eval_episodes", st.integers(max_value=0)),
    ("run.keep_checkpoints", st.integers(max_value=0)),
    ("run.total_steps", st.integers(max_value=0)),
]


def _not_a_number(text: str) -> bool:
    try:
        float(text.strip().lower())
        return False
    except ValueError:
        return True


bad_set = st.one_of(
    # an unknown section
    st.tuples(WORD.filter(lambda s: s not in SECTIONS and s != "algo"), WORD, VALUE).map(
        lambda t: f"{t[0]}.{t[1]}={t[2]}"
    ),
    # an unknown key in a real section
    st.tuples(st.sampled_from(SECTIONS), WORD, VALUE)
    .filter(lambda t: t[1] not in FIELDS[t[0]])
    .map(lambda t: f"{t[0]}.{t[1]}={t[2]}"),
    # a number field given something that is not a number
    st.tuples(st.sampled_from(NUMERIC), VALUE.filter(_not_a_number)).map(
        lambda t: f"{t[0][0]}.{t[0][1]}={t[1]}"
    ),
    # a value out of the field's range
    st.sampled_from(OUT_OF_RANGE).flatmap(lambda kv: kv[1].map(lambda v: f"{kv[0]}={v}")),
    # not SECTION.KEY=VALUE at all
    WORD.filter(lambda s: "." not in s),
)
bad_argv = st.one_of(
    bad_set.map(lambda a: ["train", "--set", a]),
    WORD.filter(lambda s: ":" not in s).map(lambda e: ["train", "--env", e]),
    st.tuples(st.sampled_from(["smax", "mamujoco"]), WORD).map(
        lambda t: ["train", "--env", f"nosuch{t[1]}:x"]
    ),
    WORD.filter(lambda a: a not in algorithm_names()).map(lambda a: ["train", "--algo", a]),
    st.integers(max_value=0).map(lambda n: ["train", "--steps", str(n)]),
    WORD.map(lambda w: ["train", f"--{w}x"]),  # unknown option
    WORD.map(lambda w: ["eval", f"/nonexistent/{w}"]),
    WORD.map(lambda w: ["train", "--resume", f"/nonexistent/{w}"]),
    # --resume takes the run's own config: any config flag beside it is refused
    st.tuples(WORD, st.sampled_from(["--env", "--algo", "--seed", "--set", "--config", "--run-name"])).map(
        lambda t: ["train", "--resume", f"/nonexistent/{t[0]}", t[1], "1"]
    ),
    WORD.filter(lambda c: c not in ("train", "eval", "plot", "report", "benchmark")).map(lambda c: [c]),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad_argv)
def test_bad_input_gives_one_line_and_exit_2(argv):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own errors
            code = e.code
    err = stderr.getvalue().strip()
    assert code == 2, (argv, err)
    assert len(err.splitlines()) == 1, (argv, err)
    assert "Traceback" not in err
