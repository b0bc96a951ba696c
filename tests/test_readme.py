"""The README still describes the code: its Python snippet runs, every command it shows for
`experiments/*.py` (and every usage line in the docstrings of `experiments/*.py` and
`configs/*.py`) parses with that script's flags into a config that validates, and every `make`
target it names exists. A renamed config field, flag or target fails here, not in a
researcher's terminal."""

import ast
import glob
import math
import os
import re
import shlex

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from fdrl import toy_train
from fdrl import train as lm_train
from repo import ROOT

README = os.path.join(ROOT, "README.md")
ABSL_FLAGS = {"verbosity", "v", "logtostderr", "alsologtostderr", "help", "helpfull", "helpshort"}


def _readme() -> str:
    with open(README) as f:
        return f.read()


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks."""
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def commands(text: str) -> list[str]:
    """Every command line for a script in experiments/: indented code lines (joined across
    trailing backslashes) and `...` spans in the prose (joined across line breaks) that start
    with `python experiments/x.py` or `x.py --`."""
    found = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if re.match(r"^ +python experiments/", line):
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            found.append(line.strip())
        i += 1
    # Inline spans in the prose only: code blocks hold backticks of their own (in comments).
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    prose = "\n".join(line for line in prose.splitlines() if not line.startswith("    "))
    for span in re.findall(r"`([^`]+)`", prose, re.S):
        span = " ".join(span.split())
        if re.match(r"^(python experiments/\w+\.py|\w+\.py --)", span):
            found.append(span if span.startswith("python ") else "python experiments/" + span)
    return found


def docstring_commands() -> list[tuple[str, str]]:
    """(file, command) for the usage lines in the module docstrings of the entry points and
    configs."""
    found = []
    paths = glob.glob(os.path.join(ROOT, "experiments", "*.py")) + glob.glob(os.path.join(ROOT, "configs", "*.py"))
    for path in sorted(paths):
        with open(path) as f:
            docstring = ast.get_docstring(ast.parse(f.read())) or ""
        found += [(os.path.relpath(path, ROOT), c) for c in commands(docstring)]
    return found


def all_commands() -> list[tuple[str, str]]:
    return [("README.md", c) for c in commands(_readme())] + docstring_commands()


def split_command(command: str) -> tuple[str, list[str], list[str]]:
    """(script path, --config* arguments, the script's other flags' names)."""
    # A placeholder (<that run's workdir>) stands for one word.
    words = shlex.split(re.sub(r"<[^>]*>", "placeholder", command), comments=True)
    assert words[0] == "python" and words[1].startswith("experiments/"), command
    config_args, other = [], []
    for word in words[2:]:
        assert word.startswith("--"), f"{word!r} in {command!r} is not a flag"
        name = word[2:].split("=", 1)[0]
        if name == "config" or name.startswith("config."):
            config_args.append(word)
        else:
            other.append(name)
    return words[1], config_args, other


def defined_flags(script: str) -> set[str]:
    """Names of the flags a script defines (flags.DEFINE_*("name", ...) and
    config_flags.DEFINE_config_file), read from its source without importing it."""
    with open(os.path.join(ROOT, script)) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr.startswith("DEFINE") and node.args
                and isinstance(node.args[0], ast.Constant)):
            names.add(node.args[0].value)
            if node.func.attr in ("DEFINE_bool", "DEFINE_boolean"):
                names.add("no" + node.args[0].value)
    return names


def parse_config(config_args: list[str]):
    """The config the flags make: the file (with its :variant) and the overrides, through
    ml_collections' own flag parser, as the scripts read it."""
    argv = ["readme"] + config_args
    flag_values = flags.FlagValues()
    # The overrides (--config.a.b) are read from sys.argv unless given as sys_argv.
    holder = config_flags.DEFINE_config_file("config", None, "config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return holder.value


def validate(config) -> None:
    """The check the entry point runs before loading anything."""
    if config.get("task", "toy") == "lm":
        lm_train.validate(config)
    else:
        toy_train.validate(config)


def test_the_docs_show_commands_of_each_entry_point():
    scripts = {split_command(c)[0] for c in commands(_readme())}
    assert {"experiments/train.py", "experiments/sample.py", "experiments/compare.py",
            "experiments/bench_sampler.py", "experiments/bench_step.py"} <= scripts
    documented = {split_command(c)[0] for _, c in docstring_commands()}
    assert {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
            if not p.endswith("common.py")} <= documented


@pytest.mark.parametrize("source,command", all_commands())
def test_documented_command_parses_and_validates(source, command, monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths are relative to the repository, as in the docs
    script, config_args, other = split_command(command)
    assert os.path.exists(os.path.join(ROOT, script)), f"{script} ({source}: {command!r}) does not exist"
    unknown = set(other) - defined_flags(script) - ABSL_FLAGS
    assert not unknown, f"{script} defines no flag {sorted(unknown)} ({source}: {command!r})"
    if not config_args or config_args[0] == "--config=...":  # "--config=..." stands for any config
        return
    validate(parse_config(config_args))


def test_readme_make_targets_exist():
    with open(os.path.join(ROOT, "Makefile")) as f:
        targets = set(re.findall(r"^([\w-]+):", f.read(), re.M))
    named = set(re.findall(r"`make ([\w-]+)`|^ {4}make ([\w-]+)", _readme(), re.M))
    named = {a or b for a, b in named}
    assert {"demo", "test"} <= named
    assert named <= targets, f"README names make targets the Makefile lacks: {sorted(named - targets)}"


def test_readme_python_snippet_runs():
    (snippet,) = python_blocks(_readme())
    # The one thing the snippet leaves to the reader: a model's sequence log-probs, here a
    # table of token logits; the batch is the snippet's inputs.
    batch, length, vocab = 6, 3, 5
    keys = jax.random.split(jax.random.PRNGKey(0), 3)

    def my_model_sequence_logp(params, tokens):
        logp = jax.nn.log_softmax(params["logits"])[jnp.arange(length), tokens]  # [B, T]
        return logp.sum(-1)

    namespace = dict(
        my_model_sequence_logp=my_model_sequence_logp,
        params={"logits": jax.random.normal(keys[0], (length, vocab))},
        tokens=jax.random.randint(keys[1], (batch, length), 0, vocab),
        ref_logp=jnp.full((batch,), -length * math.log(vocab)),
        reward=jax.random.normal(keys[2], (batch,)),
    )
    exec(compile(snippet, "README.md", "exec"), namespace)
    grads, diag = namespace["grads"], namespace["diag"]
    assert grads["logits"].shape == (length, vocab)
    assert bool(jnp.all(jnp.isfinite(grads["logits"]))) and float(jnp.abs(grads["logits"]).sum()) > 0
    for key in ("u", "pseudo_reward", "advantage", "importance_weight", "log_Z"):
        assert key in diag, f"the README says fdpg_loss returns {key!r}"


def test_readme_off_policy_call_runs():
    # The snippet's commented off-policy call, with its names bound to a batch of values.
    (snippet,) = python_blocks(_readme())
    (call,) = [line.lstrip("# ").strip() for line in snippet.splitlines() if line.startswith("# fdpg_loss(")]
    from fdrl import fdpg_loss

    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    namespace = dict(fdpg_loss=fdpg_loss, policy_logp=-3.0 + jax.random.normal(keys[0], (8,)),
                     log_P=-2.0 + jax.random.normal(keys[1], (8,)), q_logp=-3.0 + jax.random.normal(keys[2], (8,)),
                     log_Z=jnp.float32(0.5), b=jnp.float32(0.1))
    loss, diag = eval(call, namespace)
    assert bool(jnp.isfinite(loss)) and diag["importance_weight"].shape == (8,)
