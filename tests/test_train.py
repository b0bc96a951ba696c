"""The text f-DPG loop on the tiny random model (SmolLM2's tokenizer, real prompts)."""

import json
import logging
import math
import os
import signal

import jax
import numpy as np
import pytest

from configs import smollm2_gender, smollm2_sentiment, smollm2_word
from fdrl import checkpoint, train
from lm_smoke import smoke
from repo import ROOT


# sentiment's smoke run is also trained, evaluated and resumed by test_resume_continues_exactly
# and by tests/test_experiments.py: here it runs with the slow tests (the default run's 15 minutes).
@pytest.mark.parametrize("module", [smollm2_word, pytest.param(smollm2_sentiment, marks=pytest.mark.slow),
                                    smollm2_gender], ids=["word", "sentiment", "gender"])
def test_smoke_configs_train_and_log(module, tmp_path):
    config = smoke(module, tmp_path)
    out = train.train_and_evaluate(config, log=lambda s: None)
    assert int(out["state"].step) == config.steps
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        for k in ("kl_p_pi", "kl_pi_p", "js", "tv", "alignment", "kl_pi_a", "distinct_2", "self_bleu"):
            assert math.isfinite(r[k]), (k, r)
        assert r["samples"]
    assert any(p.name.startswith("events") for p in (tmp_path / "tb").iterdir())
    if module is smollm2_gender:
        assert json.load(open(tmp_path / "target.json"))["lam"]


def test_tensorboard_writer_leaves_torch_unimported(tmp_path):
    """tensorboardX imports torch where it is installed, and torch's libraries stayed resident
    for the whole run (~0.2 GB). A stand-in torch package on the path of a fresh interpreter
    records whether anything imported it; the writer still writes its events."""
    import subprocess
    import sys

    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import os\nopen(os.environ['TORCH_MARK'], 'w').close()\nTensor = object\n")
    mark, logdir = tmp_path / "torch_imported", tmp_path / "run"
    code = ("import sys; from fdrl import train; w = train._Writers(sys.argv[1], append=False); "
            "w.write(0, 'eval', {'js': 0.5}, ['a sample']); w.close(); print('torch' in sys.modules)")
    env = dict(os.environ, TORCH_MARK=str(mark),
               PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code, str(logdir)], env=env, capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False" and not mark.exists()
    assert any(p.name.startswith("events") for p in (logdir / "tb").iterdir())
    assert json.loads(open(logdir / "metrics.jsonl").readline())["js"] == 0.5


# The warm-up's case restores everything the constant one does, and the step count besides:
# the constant schedule runs with the slow tests. The first stops at steps=2; the warm-up's by
# Ctrl-C (a SIGINT) after step 3, which is not a checkpoint step: the run saves it as it stops.
@pytest.mark.parametrize("overrides", [pytest.param({}, marks=pytest.mark.slow), dict(warmup_steps=3)],
                         ids=["constant", "warmup"])
def test_resume_continues_exactly(overrides, tmp_path, monkeypatch):
    """A warm-up's step size depends on the optimiser's step count: resuming must restore it."""
    straight = train.train_and_evaluate(smoke(smollm2_sentiment, tmp_path / "a", **overrides), log=lambda s: None)
    straight = straight["state"]
    if overrides:
        step = train.Trainer.step
        handler = signal.getsignal(signal.SIGINT)  # SIG_IGN where the tests run as a background job

        def step_then_ctrl_c(self, state):
            state, scalars = step(self, state)
            if int(state.step) == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return state, scalars

        monkeypatch.setattr(train.Trainer, "step", step_then_ctrl_c)
        with pytest.raises(KeyboardInterrupt, match="SIGINT: stopped after step 3 and saved it in .*resume=True"):
            train.train_and_evaluate(smoke(smollm2_sentiment, tmp_path / "b", **overrides), log=lambda s: None)
        monkeypatch.undo()
        assert checkpoint.saved_steps(str(tmp_path / "b")) == [2, 3]
        assert signal.getsignal(signal.SIGINT) is handler  # the run's handlers are gone
    else:
        train.train_and_evaluate(smoke(smollm2_sentiment, tmp_path / "b", steps=2, **overrides), log=lambda s: None)
    resumed = train.train_and_evaluate(smoke(smollm2_sentiment, tmp_path / "b", resume=True, **overrides),
                                       log=lambda s: None)
    assert int(resumed["state"].step) == 4
    with pytest.MonkeyPatch.context() as patch:  # a fresh run onto saved checkpoints fails before the model loads
        patch.setattr(train, "Trainer", _no_model)
        with pytest.raises(FileExistsError, match="resume=True"):
            train.train_and_evaluate(smoke(smollm2_sentiment, tmp_path / "b"), log=lambda s: None)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed["state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _no_model(*args, **kwargs):
    raise AssertionError("the model was built")


def test_a_second_run_on_a_busy_workdir_fails_at_once_naming_the_first(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "Trainer", _no_model)
    config = smoke(smollm2_word, tmp_path / "run")
    with checkpoint.claim_workdir(config.workdir):  # as a first run, launched in parallel, holds it
        with pytest.raises(RuntimeError, match=r"another run \(pid \d+ on .*\) is writing to workdir=.*run'"):
            train.train_and_evaluate(config, log=lambda s: None)
    with pytest.raises(ValueError, match="unknown f-divergence"):  # a bad value still fails first, by name
        train.train_and_evaluate(smoke(smollm2_word, tmp_path / "other", f="kl"), log=lambda s: None)
    assert not (tmp_path / "other").exists()
    with pytest.raises(AssertionError, match="the model was built"):  # the first run ended: the workdir is free
        train.train_and_evaluate(config, log=lambda s: None)


def test_offpolicy_and_truncated_sampling_use_importance_weights(tmp_path):
    config = smoke(smollm2_sentiment, tmp_path, proposal="offpolicy", top_p=0.9, steps=2, eval_every=2)
    trainer = train.Trainer(config)
    state = trainer.init_state()
    state, scalars = trainer.step(state)
    assert state.proposal_params is not None
    assert math.isfinite(float(scalars["loss"])) and float(scalars["importance_weight_max"]) != 1.0


def test_bad_config_values(tmp_path):
    for field, value, match in [("f", "kl", "unknown f-divergence"), ("proposal", "x", "unknown proposal"),
                                ("model", "gpt", "unknown model"), ("lr_schedule", "cosin", "unknown lr_schedule"),
                                ("warmup_steps", -2, "warmup_steps=-2 must be an integer >= 0")]:
        with pytest.raises(ValueError, match=match):
            train.Trainer(smoke(smollm2_word, tmp_path, **{field: value}))
    with pytest.raises(ValueError, match="eval_chunk=3 must be 0 .* or divide eval_batch_size=4"):
        train.Trainer(smoke(smollm2_word, tmp_path, eval_chunk=3))
    config = smoke(smollm2_sentiment, tmp_path)
    config.target.beta = -1.0
    with pytest.raises(ValueError, match="target.beta=-1.0 must be a finite number > 0"):
        train.Trainer(config)


def test_restore_run_and_generate(tmp_path):
    """A run's checkpoints restore as saved (latest or a named step); generate samples
    num_samples completions per prompt, in order, with teacher-forced log-probs."""
    out = train.train_and_evaluate(smoke(smollm2_sentiment, tmp_path), log=lambda s: None)
    trainer = out["trainer"]
    latest = train.restore_run(trainer)
    for a, b in zip(jax.tree.leaves(out["state"]), jax.tree.leaves(latest)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(train.restore_run(trainer, step=2).step) == 2
    light = train.restore_run(trainer, params_only=True)  # the moments are never read
    assert int(light.step) == 4 and light.opt_state is None and light.log_z is None
    for a, b in zip(jax.tree.leaves(out["state"].params), jax.tree.leaves(light.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=r"unknown state fields \['weights'\]"):
        train.restore_fields(train.checkpoint_manager(str(tmp_path)), trainer.abstract_state, ("weights",))
    with pytest.raises(ValueError, match=r"no checkpoint of step=3 in .* it holds steps \[2, 4\]"):
        train.restore_run(trainer, step=3)
    with pytest.raises(FileNotFoundError, match="no checkpoints in workdir=.*nowhere"):
        train.restore_run(train.Trainer(smoke(smollm2_sentiment, tmp_path / "nowhere")))

    prompts, key = ["Describe your morning.", "Hi"], jax.random.PRNGKey(5)
    records = trainer.generate(latest.params, prompts, key, num_samples=3)
    assert [r["prompt"] for r in records] == [prompts[0]] * 3 + [prompts[1]] * 3
    assert records == trainer.generate(latest.params, prompts, key, num_samples=3)  # the key decides
    texts = [r["completion"] for r in records]
    np.testing.assert_allclose([r["score"] for r in records], trainer.task.target.score(texts), rtol=1e-6)
    np.testing.assert_allclose([r["log_potential"] for r in records], trainer.task.target.log_potential(texts),
                               rtol=1e-6)
    assert all(math.isfinite(r["policy_logp"]) and r["policy_logp"] < 0 for r in records)
    assert any(r["policy_logp"] != r["ref_logp"] for r in records)  # trained: π differs from a
    for r in trainer.generate(trainer.task.ref_params, prompts, key, num_samples=1):
        assert r["policy_logp"] == r["ref_logp"]
    with pytest.raises(ValueError, match="num_samples=0"):
        trainer.generate(latest.params, prompts, key, num_samples=0)


@pytest.mark.eight_devices
def test_generate_pads_to_whole_batch_shards(tmp_path):
    """3 completions on a mesh that splits the batch 8 ways: padded to 8, 3 returned, the same
    texts as on one device."""
    one = train.Trainer(smoke(smollm2_word, tmp_path / "one"))
    eight = train.Trainer(smoke(smollm2_word, tmp_path / "eight", mesh=dict(shape=(-1, 1, 1)), batch_size=8,
                                eval_batch_size=8))
    assert train.sharding.batch_shards(eight.mesh, eight.rules) == 8
    key = jax.random.PRNGKey(0)
    a = one.generate(one.task.ref_params, ["Hi", "Tell me a story.", "Why?"], key)
    b = eight.generate(eight.task.ref_params, ["Hi", "Tell me a story.", "Why?"], key)
    assert len(a) == len(b) == 3
    assert [r["prompt"] for r in b] == ["Hi", "Tell me a story.", "Why?"]
    for x, y in zip(a, b):
        assert x["completion"] == y["completion"]
        assert x["policy_logp"] == pytest.approx(y["policy_logp"], abs=1e-3)


def test_step_zero_estimates_use_a_real_log_z(tmp_path):
    """Before any step the running Ẑ is empty; evaluation must still estimate it."""
    trainer = train.Trainer(smoke(smollm2_sentiment, tmp_path, eval_batch_size=8))
    values, _, _ = trainer.evaluate(trainer.init_state(), jax.random.PRNGKey(0))
    assert values["log_Z"] != 0.0
    assert 0.0 <= values["tv"] <= 1.5 and values["js"] <= 1.0 and values["kl_pi_p"] > -0.05


def test_evaluation_in_chunks(tmp_path):
    """eval_chunk draws the evaluation batch a chunk at a time (chunk i from key fold_in(key, i))
    and estimates from all of it; one chunk is the unchunked evaluation."""
    trainer = train.Trainer(smoke(smollm2_sentiment, tmp_path, eval_batch_size=8, eval_chunk=4))
    state, key = trainer.init_state(), jax.random.PRNGKey(3)
    values, prompts, texts = trainer.evaluate(state, key)
    assert len(texts) == len(prompts) == 8 and all(math.isfinite(v) for v in values.values())
    trainer.config.eval_batch_size = 4  # one chunk of the same size, from the first chunk's key
    _, first_prompts, first_texts = trainer.evaluate(state, jax.random.fold_in(key, 0))
    assert (first_prompts, first_texts) == (prompts[:4], texts[:4]) and texts[4:] != texts[:4]
    trainer.config.eval_chunk = 0  # all at once: the same as one chunk
    assert trainer.evaluate(state, jax.random.fold_in(key, 0))[2] == first_texts


@pytest.mark.parametrize("algo, microbatch", [("ppo", 0), pytest.param("fppo", 0, marks=pytest.mark.slow),
                                              ("ppo", 2)], ids=["ppo", "fppo", "ppo-microbatches"])
def test_two_ppo_steps_on_the_tiny_model(algo, microbatch, tmp_path):
    config = smoke(smollm2_sentiment, tmp_path, algo=algo, steps=2, eval_every=2, checkpoint_every=0,
                   microbatch_size=microbatch)
    if microbatch:  # one minibatch of the 4 rows, differentiated 2 at a time
        config.ppo.minibatches = 1
    trainer = train.Trainer(config)
    state = trainer.init_state()
    before = jax.tree.leaves(state.params)
    before = [np.asarray(x).copy() for x in before]
    for _ in range(2):
        state, scalars = trainer.step(state)
        assert all(math.isfinite(float(v)) for k, v in scalars.items() if k != "log_Z")
    after = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
    assert trainer.task.model_config.value_head
    if algo == "ppo":
        assert float(state.kl.beta) != 0.1  # the adaptive controller moved


@pytest.mark.parametrize("overrides", [dict(), dict(eval_batch_size=8, eval_chunk=4, microbatch_size=2),
                                       pytest.param(dict(top_k=5, eval_batch_size=4, proposal="offpolicy"),
                                                    marks=pytest.mark.slow)],
                         ids=["default", "eval-chunks-microbatches", "topk-offpolicy"])
def test_compile_ahead_covers_the_whole_run(overrides, tmp_path, monkeypatch, caplog):
    """Trainer.compile() compiles, before any train state exists, everything the run then
    calls: XLA compiles none of the update, the sampler or the scoring again during λ
    fitting, training and evaluation (a key split from the train state and one made on
    the host once compiled the sampler twice)."""
    config = smoke(smollm2_gender, tmp_path, steps=2, eval_every=2, **overrides)
    trainer = train.Trainer(config)
    caplog.set_level(logging.DEBUG, logger="jax._src.dispatch")
    trainer.compile()
    names = ("update)", "jit(_sample)", "jit(sequence_logp)")  # update or accumulated_update
    ahead = [r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.getMessage()]
    assert all(any(n in m for m in ahead) for n in names), ahead
    caplog.clear()
    traced = trainer.task.sampler.trace_count
    monkeypatch.setattr(train, "Trainer", lambda *args, **kwargs: trainer)
    out = train.train_and_evaluate(config, log=lambda s: None)
    assert int(out["state"].step) == 2
    during = [r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.getMessage()]
    assert not [m for m in during if any(n in m for n in names)], during
    assert trainer.task.sampler.trace_count == traced


