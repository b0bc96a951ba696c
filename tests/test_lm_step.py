"""The LM updates on the tiny random model: from the sampler's states, in microbatches, and
PPO in chunks, each against the whole-batch, teacher-forced update it replaces."""

import jax
import numpy as np
import pytest

from configs import smollm2_sentiment
from fdrl import lm_step, lm_task, train
from lm_smoke import smoke


def test_update_from_sampler_states_matches_teacher_forcing(tmp_path):
    """reuse_sampler_states (on in the configs) skips the policy's forward pass in the update;
    the step's loss and statistics are those of the teacher-forced update."""
    results = []
    for reuse in (True, False):
        config = smoke(smollm2_sentiment, tmp_path / str(reuse), reuse_sampler_states=reuse)
        assert lm_task.reuses_sampler_states(config) == reuse
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
        assert not lm_task.reuses_sampler_states(smoke(smollm2_sentiment, tmp_path, **overrides)), overrides


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
    for update, args in ((lm_step.update, batch), (lm_step.accumulated_update, halves)):
        jitted[update] = jax.jit(functools.partial(update, config, trainer.task.graphdef, keep_gradient))
        new, scalars = jitted[update](trainer.task.ref_params, state, *args)
        grads = [np.asarray(g) for g in jax.tree.leaves(new.opt_state)]
        results.append((grads, {k: float(v) for k, v in scalars.items()}, new))
    (whole_grads, whole, whole_state), (micro_grads, micro, micro_state) = results
    norm = np.sqrt(sum(float(np.sum(g ** 2)) for g in whole_grads))
    assert norm > 0 and len(whole_grads) == len(jax.tree.leaves(state.params))
    for a, b in zip(whole_grads, micro_grads):
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(a) + 1e-7 * norm
    # The loss, −mean(sg(w·A)·log π) with A summing to ~0, is a small number made of terms the
    # size of log π (~−87 nats a row here): its float32 round-off scales with |log π|, not with
    # the loss (tempered, on an AMD Zen 3 host: 1.3e-5 apart at a loss of −0.105).
    policy_logp = lm_step.sequence_logp(trainer.task.graphdef, state.params, *batch[:4])
    loss_scale = float(np.mean(np.abs(np.asarray(policy_logp))))
    for k, v in whole.items():
        assert micro[k] == pytest.approx(v, rel=1e-4, abs=max(1e-5, 1e-6 * loss_scale if k == "loss" else 0)), k
    if config.proposal == "offpolicy":
        assert whole["importance_weight_max"] != 1.0
    for a, b in zip(jax.tree.leaves((whole_state.log_z, whole_state.baseline, whole_state.key, whole_state.step)),
                    jax.tree.leaves((micro_state.log_z, micro_state.baseline, micro_state.key, micro_state.step))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # Extremes: a violated hard constraint (log P = −inf) and log-potentials of ±1e4 keep the
    # accumulated gradient and the step's scalars finite.
    extreme = (halves[5][0].at[:].set(jnp.array([-jnp.inf, 1e4])), halves[5][1].at[:].set(jnp.array([-1e4, 0.0])))
    new, scalars = jitted[lm_step.accumulated_update](trainer.task.ref_params, state, *halves[:5], extreme, halves[6])
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
        assert lm_task.num_microbatches(run_config) == micro
        update = jax.jit(functools.partial(lm_step.ppo_update, run_config, trainer.task.graphdef, keep_gradient))
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
