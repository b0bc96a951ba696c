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


def smoke(module, tmp_path, **overrides):
    config = module.get_config("smoke")
    config.workdir = str(tmp_path)
    config.update(overrides)
    return config


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


@pytest.mark.parametrize("module", [smollm2_word, smollm2_sentiment, smollm2_gender],
                         ids=["word", "sentiment", "gender"])
@pytest.mark.parametrize("variant", ["", "demo", "smoke"])
@pytest.mark.parametrize("algo", train.ALGOS)
def test_shipped_configs_validate(module, variant, algo):
    config = module.get_config(variant)
    config.algo = algo
    train.validate(config)


# (field, bad value, algo, the message): each fails in train.validate, before a model loads.
BAD_FIELDS = [
    ("ppo.minibatches", 0, "ppo", "ppo.minibatches=0 must be an integer >= 1"),
    ("ppo.epochs", 0, "fppo", "ppo.epochs=0 must be an integer >= 1"),
    ("batch_size", 3, "ppo", "batch_size=3 must be divisible by ppo.minibatches=2"),
    ("ppo.clip_eps", 1.0, "ppo", r"ppo.clip_eps=1.0 must be a finite number in \(0, 1\)"),
    ("ppo.gamma", 1.5, "ppo", r"ppo.gamma=1.5 must be a finite number in \[0, 1\]"),
    ("ppo.gae_lambda", -0.1, "fppo", "ppo.gae_lambda=-0.1 must be"),
    ("ppo.vf_coef", -1.0, "ppo", "ppo.vf_coef=-1.0 must be a finite number >= 0"),
    ("ppo.value_clip", -1.0, "ppo", "ppo.value_clip=-1.0 must be"),
    ("ppo.aggregation", "mean", "fppo", "unknown ppo.aggregation='mean'"),
    ("ppo.kl_beta", 0.0, "ppo", "ppo.kl_beta=0.0 must be a finite number > 0"),
    ("ppo.kl_controller", "pid", "ppo", "unknown ppo.kl_controller='pid'"),  # was silently "fixed"
    ("ppo.kl_target", 0.0, "ppo", "ppo.kl_target=0.0 must be"),
    ("ppo.kl_gain", -0.1, "ppo", "ppo.kl_gain=-0.1 must be"),
    ("algo", "trpo", "fdpg", "unknown algo='trpo'"),
    ("batch_size", 1, "fdpg", "batch_size=1 must be an integer >= 2"),
    ("max_abs_u", 0.0, "fdpg", "max_abs_u=0.0 must be a finite number > 0"),
    ("max_abs_u", float("nan"), "fdpg", "max_abs_u=nan must be a finite number > 0"),
    ("param_dtype", "int8", "fdpg", "param_dtype='int8' must name a floating-point dtype"),
    ("compute_dtype", "f32", "fdpg", "compute_dtype='f32' must name a floating-point dtype"),
    ("remat", "some", "fdpg", "unknown remat='some'"),
    ("logits_chunk", -1, "fdpg", "logits_chunk=-1 must be an integer >= 0"),
    ("decode_column_blocks", -2, "fdpg", "decode_column_blocks=-2 must be"),
    ("decode_transposed_layers", "yes", "fdpg", "unknown decode_transposed_layers='yes'"),
    ("num_prompts", -1, "fdpg", "num_prompts=-1 must be"),
    ("num_logged_samples", -1, "fdpg", "num_logged_samples=-1 must be"),
    ("target.kind", "ranking", "fdpg", "unknown target.kind='ranking'"),
    ("baseline_decay", 1.0, "fdpg", r"baseline_decay=1.0 must be a finite number in \[0, 1\)"),
    ("baseline_window", 0, "fdpg", "baseline_window=0 must be an integer >= 1"),
    ("max_new_tokens", 0, "fdpg", "max_new_tokens=0 must be an integer >= 1"),
    ("temperature", -0.5, "fdpg", "temperature=-0.5 must be a finite number >= 0"),
    ("top_k", -1, "fdpg", "top_k=-1 must be an integer >= 0"),
    ("top_p", 0.0, "fdpg", r"top_p=0.0 must be a finite number in \(0, 1\]"),
    ("learning_rate", 0.0, "fdpg", "learning_rate=0.0 must be a finite number > 0"),
    ("grad_clip", -1.0, "fdpg", "grad_clip=-1.0 must be"),
    ("adam.b1", 1.0, "fdpg", r"adam.b1=1.0 must be a finite number in \[0, 1\)"),
    ("adam.b2", -0.1, "fdpg", "adam.b2=-0.1 must be"),
    ("adam.eps", 0.0, "fdpg", "adam.eps=0.0 must be a finite number > 0"),
    ("adam.weight_decay", -0.01, "fdpg", "adam.weight_decay=-0.01 must be"),
    ("adam.mu_dtype", "int8", "fdpg", "adam.mu_dtype='int8' must name a floating-point dtype"),
    ("steps", -1, "fdpg", "steps=-1 must be an integer >= 0"),
    ("log_every", 0, "fdpg", "log_every=0 must be an integer >= 1"),
    ("eval_every", 0, "fdpg", "eval_every=0 must be an integer >= 1"),
    ("checkpoint_every", -1, "fdpg", "checkpoint_every=-1 must be an integer >= 0"),
    ("eval_batch_size", 0, "fdpg", "eval_batch_size=0 must be an integer >= 1"),
    ("eval_chunk", -4, "fdpg", "eval_chunk=-4 must be an integer >= 0"),
    ("microbatch_size", -2, "fdpg", "microbatch_size=-2 must be an integer >= 0"),
    ("microbatch_size", 3, "fdpg", r"microbatch_size=3 must be 0 \(the whole batch at once\) or divide batch_size=16"),
]


@pytest.mark.parametrize("field, value, algo, match", BAD_FIELDS, ids=[f"{b[0]}={b[1]}" for b in BAD_FIELDS])
def test_bad_fields_are_named_before_loading(field, value, algo, match):
    config = smollm2_word.get_config()  # the real model: validate must fail before it loads
    config.algo = algo
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=match):
        train.validate(config)


def test_ppo_microbatches_must_divide_a_minibatch():
    config = smollm2_word.get_config()
    config.algo, config.batch_size, config.microbatch_size = "ppo", 24, 8
    with pytest.raises(ValueError, match=r"microbatch_size=8 must divide a PPO minibatch \(or be at least one\): "
                                         r"batch_size/ppo.minibatches = 24/2 = 12"):
        train.validate(config)
    for minibatches in (3, 4, 1):  # minibatches of 8 and 6 rows, each differentiated at once; 24 rows, in 3
        config.ppo.minibatches = minibatches
        train.validate(config)


def test_decode_transposed_layers_reaches_the_sampler():
    from types import SimpleNamespace

    from fdrl.models import llama
    config = smollm2_word.get_config()
    tok = SimpleNamespace(eos_id=2, pad_id=0)
    for value, transposed in (("auto", None), ("on", True), ("off", False)):
        config.decode_transposed_layers = value
        train.validate(config)
        sampler = train.make_sampler(config, None, llama.LlamaConfig.tiny(), tok)
        assert sampler.transposed_layers is transposed


def test_target_fields_checked_for_their_kind():
    sentiment, gender = smollm2_sentiment.get_config(), smollm2_gender.get_config()
    sentiment.target.beta = 0.0
    with pytest.raises(ValueError, match="target.beta=0.0 must be a finite number > 0"):
        train.validate(sentiment)
    gender.target.fit_batches = 0
    with pytest.raises(ValueError, match="target.fit_batches=0 must be an integer >= 1"):
        train.validate(gender)


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


def test_update_from_sampler_states_matches_teacher_forcing(tmp_path):
    """reuse_sampler_states (on in the configs) skips the policy's forward pass in the update;
    the step's loss and statistics are those of the teacher-forced update."""
    results = []
    for reuse in (True, False):
        config = smoke(smollm2_sentiment, tmp_path / str(reuse), reuse_sampler_states=reuse)
        assert train.reuses_sampler_states(config) == reuse
        trainer = train.Trainer(config)
        assert trainer.task.sampler.keep_states == reuse
        init = trainer.init_state()
        before = [np.asarray(x) for x in jax.tree.leaves(init.params)]  # copied: the update donates the state
        state, scalars = trainer.step(init)
        moves = [np.sign(np.asarray(a) - b) for a, b in zip(jax.tree.leaves(state.params), before)]
        results.append(({k: float(v) for k, v in scalars.items()}, np.concatenate([m.ravel() for m in moves])))
    (with_states, moves_a), (forced, moves_b) = results
    for k in ("loss", "pseudo_reward", "kl_pi_a_batch", "log_Z"):
        assert with_states[k] == pytest.approx(forced[k], abs=1e-4), k
    # Adam's first step moves each weight by ±lr, the sign of its gradient: the same signs
    # (but for gradients within round-off of 0) means the same gradient.
    assert np.mean(moves_a == moves_b) > 0.99
    for overrides in (dict(proposal="offpolicy"), dict(top_k=5), dict(temperature=0.7), dict(algo="ppo"),
                      dict(microbatch_size=2)):
        assert not train.reuses_sampler_states(smoke(smollm2_sentiment, tmp_path, **overrides)), overrides


@pytest.mark.parametrize("overrides", [dict(), dict(proposal="offpolicy"), dict(temperature=0.7)],
                         ids=["on-policy", "off-policy", "tempered"])
def test_microbatched_update_is_the_whole_batch_update(overrides, tmp_path):
    """microbatch_size (gradient accumulation): the batch's 2 microbatches give the whole
    batch's gradient, loss and estimator states. The optimiser here keeps the gradient as
    its state. π is moved away from a (and, off-policy, from q) first, and the log-potentials
    are random: the tiny model's texts all score 0, and at π = a = p the gradient would be 0."""
    import functools

    import jax.numpy as jnp
    import optax

    config = smoke(smollm2_sentiment, tmp_path, reuse_sampler_states=False, **overrides)
    trainer = train.Trainer(config)
    zeros = functools.partial(jax.tree.map, jnp.zeros_like)
    keep_gradient = optax.GradientTransformation(zeros, lambda grads, _, params=None: (zeros(grads), grads))
    state = trainer.init_state()
    noise = jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(state.params)))
    state = state._replace(params=jax.tree.unflatten(jax.tree.structure(state.params), [
        x + 0.02 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(jax.tree.leaves(state.params), noise)]))
    state = state._replace(opt_state=keep_gradient.init(state.params))
    sampler_params = state.params if state.proposal_params is None else state.proposal_params
    batch = list(trainer.step_batch(sampler_params, jax.random.PRNGKey(0)))  # the whole batch of 4
    batch[5] = trainer.shard_batch(np.asarray([0.5, -1.0, 2.0, 0.0], np.float32))  # log-potentials
    halves = tuple((a[:2], a[2:]) for a in batch)
    results = []
    jitted = {}
    for update, args in ((train.update, batch), (train.accumulated_update, halves)):
        jitted[update] = jax.jit(functools.partial(update, config, trainer.task.graphdef, keep_gradient))
        new, scalars = jitted[update](trainer.task.ref_params, state, *args)
        grads = [np.asarray(g) for g in jax.tree.leaves(new.opt_state)]
        results.append((grads, {k: float(v) for k, v in scalars.items()}, new))
    (whole_grads, whole, whole_state), (micro_grads, micro, micro_state) = results
    norm = np.sqrt(sum(float(np.sum(g ** 2)) for g in whole_grads))
    assert norm > 0 and len(whole_grads) == len(jax.tree.leaves(state.params))
    for a, b in zip(whole_grads, micro_grads):
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(a) + 1e-7 * norm
    for k, v in whole.items():
        assert micro[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    if config.proposal == "offpolicy":
        assert whole["importance_weight_max"] != 1.0
    for a, b in zip(jax.tree.leaves((whole_state.log_z, whole_state.baseline, whole_state.key, whole_state.step)),
                    jax.tree.leaves((micro_state.log_z, micro_state.baseline, micro_state.key, micro_state.step))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # Extremes: a violated hard constraint (log P = −inf) and log-potentials of ±1e4 keep the
    # accumulated gradient and the step's scalars finite.
    extreme = (halves[5][0].at[:].set(jnp.array([-jnp.inf, 1e4])), halves[5][1].at[:].set(jnp.array([-1e4, 0.0])))
    new, scalars = jitted[train.accumulated_update](trainer.task.ref_params, state, *halves[:5], extreme, halves[6])
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(new.opt_state))
    assert all(np.isfinite(float(v)) for k, v in scalars.items() if k != "log_Z"), scalars


@pytest.mark.parametrize("algo,aggregation", [("ppo", "token_mean"), ("fppo", "sequence_mean"),
                                               pytest.param("ppo", "sequence_sum", marks=pytest.mark.slow)])
def test_microbatched_ppo_update_is_the_whole_batch_update(algo, aggregation, tmp_path):
    """PPO with microbatch_size: the rollouts scored 2 rows at a time, and each minibatch of 4
    rows differentiated 2 at a time, give the whole batch's minibatch gradients and scalars.
    Rows end at different lengths (one has no token), so a chunk's share of a token mean
    differs from its share of rows. The optimiser keeps the gradient as its state, so every
    minibatch is differentiated at the same parameters and the last one's gradient is kept."""
    import functools

    import jax.numpy as jnp
    import optax

    config = smoke(smollm2_sentiment, tmp_path, algo=algo, batch_size=8, microbatch_size=2)
    config.ppo.update(epochs=1, minibatches=2, aggregation=aggregation)
    trainer = train.Trainer(config)
    zeros = functools.partial(jax.tree.map, jnp.zeros_like)
    keep_gradient = optax.GradientTransformation(zeros, lambda grads, _, params=None: (zeros(grads), grads))
    state = trainer.init_state()
    state = state._replace(opt_state=keep_gradient.init(state.params))
    parts = []
    for i in range(4):  # four sampling calls of 2 rows; the log-potentials and contexts are set below
        prompt, valid, out, ctx = trainer.sample(state.params, jax.random.PRNGKey(i), 2)
        parts.append(list(trainer.update_batch(prompt, valid, out, None, ctx)))
    lengths = np.array([8, 1, 5, 0, 3, 8, 2, 6])
    mask = np.arange(config.max_new_tokens)[None] < lengths[:, None]
    rng = np.random.default_rng(0)
    for i, part in enumerate(parts):
        part[3] = trainer.shard_batch(mask[2 * i:2 * i + 2])
        part[4] = trainer.shard_batch(np.where(mask[2 * i:2 * i + 2], np.asarray(part[4]), 0.0).astype(np.float32))
        part[5] = trainer.shard_batch(rng.normal(size=2).astype(np.float32))  # log-potentials
        part[6] = trainer.shard_batch(np.asarray([2 * i, 2 * i + 1], np.int32))  # context ids
    micro_args = tuple(zip(*parts))
    whole_args = [trainer.shard_batch(np.concatenate([np.asarray(a) for a in arrays])) for arrays in micro_args]
    results, updates = [], []
    for micro, args in ((1, whole_args), (4, micro_args)):
        run_config = config.copy_and_resolve_references()
        run_config.microbatch_size = config.batch_size // micro
        assert train.num_microbatches(run_config) == micro
        update = jax.jit(functools.partial(train.ppo_update, run_config, trainer.task.graphdef, keep_gradient))
        updates.append(update)
        new, scalars = update(trainer.task.ref_params, state, *args)
        results.append(([np.asarray(g) for g in jax.tree.leaves(new.opt_state)],
                        {k: float(v) for k, v in scalars.items()}, new))
    (whole_grads, whole, whole_state), (micro_grads, micro, micro_state) = results
    norm = np.sqrt(sum(float(np.sum(g ** 2)) for g in whole_grads))
    assert norm > 0 and whole["value_loss"] > 0
    for a, b in zip(whole_grads, micro_grads):
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(a) + 1e-7 * norm
    assert whole.keys() == micro.keys()
    for k, v in whole.items():
        assert micro[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    for a, b in zip(jax.tree.leaves((whole_state.log_z, whole_state.kl, whole_state.key)),
                    jax.tree.leaves((micro_state.log_z, micro_state.kl, micro_state.key))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # Extremes: a violated hard constraint (log-potential −inf) and ±1e4 keep the gradient and
    # the scalars finite, whole and in microbatches (PPO-RLHF's reward was −inf, its step NaN).
    extreme = np.array([-np.inf, 1e4, -1e4, 0.0, -np.inf, 3.0, 1e4, -1e4], np.float32)
    whole_args[5] = trainer.shard_batch(extreme)
    micro_args = micro_args[:5] + (tuple(trainer.shard_batch(extreme[i:i + 2]) for i in range(0, 8, 2)),) + \
        micro_args[6:]
    for update, args in zip(updates, (whole_args, micro_args)):
        new, scalars = update(trainer.task.ref_params, state, *args)
        assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(new.opt_state))
        assert all(np.isfinite(float(v)) for k, v in scalars.items() if k != "log_Z"), scalars


def test_evaluation_chunks_follow_the_microbatch():
    """eval_chunk = 0 evaluates a microbatch at a time where the run samples in them (and the
    microbatch divides eval_batch_size), else all at once; a set eval_chunk wins."""
    config = smollm2_word.get_config()
    assert (config.eval_batch_size, train.eval_chunk_size(config)) == (16, 16)
    config.batch_size, config.microbatch_size = 64, 8
    assert train.eval_chunk_size(config) == 8
    config.microbatch_size = 32  # does not divide 16
    assert train.eval_chunk_size(config) == 16
    config.eval_chunk = 4
    assert train.eval_chunk_size(config) == 4
