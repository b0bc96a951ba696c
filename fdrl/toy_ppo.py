"""PPO-RLHF and f-PPO on the exact toy problem (the token-level path of DESIGN.md §3).

    algo = "ppo"    classic RLHF: r_t = −β(log π_t − log a_t) + β·log_potential(x) at the end
                    (for the rlhf target β·log_potential = r(x)); fixed or adaptive β
    algo = "fppo"   terminal reward −f'(π(x)/p(x)) of any f, the same PPO machinery

Per step: one batch of rollouts from π, GAE with a tabular critic V(prefix), then
`ppo_epochs` × `ppo_minibatches` clipped-surrogate updates as a `lax.scan` inside
the jitted step. The sample budget per step equals f-DPG's (`batch_size`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fdrl import estimators, ppo, toy
from fdrl.config_checks import check_choice, check_int, check_number

Array = jax.Array
ALGOS = ("ppo", "fppo")


class PPOExtras(NamedTuple):
    critic: Array  # [P] V(prefix)
    critic_opt_state: optax.OptState
    kl: ppo.KLControllerState


def init_extras(config, problem: toy.ToyProblem) -> PPOExtras:
    critic = jnp.zeros((problem.base_logits.shape[0],), jnp.float32)
    return PPOExtras(critic=critic, critic_opt_state=optax.adam(config.critic_learning_rate).init(critic),
                     kl=ppo.kl_controller_init(config.beta))


def validate(config) -> None:
    """Raises ValueError naming the first bad PPO field of a toy config."""
    check_choice(config, "algo", ALGOS)
    check_int(config, "ppo_epochs", low=1)
    check_int(config, "ppo_minibatches", low=1)
    if config.batch_size % config.ppo_minibatches:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by ppo_minibatches={config.ppo_minibatches}")
    check_number(config, "clip_eps", low=0, high=1, low_open=True, high_open=True)
    check_choice(config, "ppo_aggregation", ppo.AGGREGATIONS)
    check_number(config, "gamma", low=0, high=1)
    check_number(config, "gae_lambda", low=0, high=1)
    check_number(config, "critic_learning_rate", low=0, low_open=True)
    check_number(config, "value_clip", low=0)
    check_choice(config, "kl_controller", ("fixed", "adaptive"))
    check_number(config, "kl_target", low=0, low_open=True)
    check_number(config, "kl_gain", low=0)
    if config.algo == "ppo":
        check_number(config, "beta", low=0, low_open=True)  # the KL coefficient's start


def train_step(config, problem: toy.ToyProblem, target: toy.ToyTarget, optimizer, state):
    """One PPO step: rollouts, rewards, GAE, then the scanned update phase. Returns (state, scalars)."""
    extras: PPOExtras = state.extra
    family, v = config.family, problem.vocab_size
    key, sample_key, perm_key = jax.random.split(state.key, 3)
    tokens, _ = toy.sample(problem, family, state.params, sample_key, config.batch_size)
    mask = jnp.ones(tokens.shape, bool)
    old_logp = toy.token_logp(problem, family, state.params, tokens)
    ref_logp = toy.token_logp(problem, "tabular", {"logits": problem.base_logits}, tokens)
    ids, log_P = toy.score(problem, target, tokens)
    log_z = estimators.log_z_update(state.log_z, log_P, jnp.sum(old_logp, 1))
    log_Z = estimators.log_z_value(log_z)

    if config.algo == "ppo":
        beta = extras.kl.beta
        score = ppo.rlhf_score(target.log_potential[ids], beta, config.max_abs_u)
        rewards = ppo.rlhf_token_rewards(old_logp, ref_logp, score, mask, beta)
    else:
        rewards = ppo.fppo_token_rewards(config.f, jnp.sum(old_logp, 1), log_P, log_Z, mask,
                                         alpha=config.get("alpha"), max_abs_u=config.max_abs_u)
    prefixes = toy.prefix_index(tokens, v)
    old_values = extras.critic[prefixes] if config.use_critic else jnp.zeros(tokens.shape)
    advantages, returns = ppo.gae(rewards, old_values, mask, config.gamma, config.gae_lambda)
    if config.whiten_advantages:
        advantages = ppo.whiten(advantages, mask)

    critic_opt = optax.adam(config.critic_learning_rate)
    size = config.batch_size // config.ppo_minibatches

    def minibatch(carry, idx):
        params, opt_state, critic, critic_opt_state = carry
        mb = lambda x: x[idx]

        def loss_fn(params):
            logp = toy.token_logp(problem, family, params, mb(tokens))
            return ppo.ppo_policy_loss(logp, mb(old_logp), mb(advantages), mb(mask), config.clip_eps,
                                       config.ppo_aggregation)

        (loss, diag), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if config.use_critic:
            v_grad = jax.grad(lambda c: ppo.value_loss(c[mb(prefixes)], mb(old_values), mb(returns), mb(mask),
                                                       config.value_clip))(critic)
            c_updates, critic_opt_state = critic_opt.update(v_grad, critic_opt_state, critic)
            critic = optax.apply_updates(critic, c_updates)
        return (params, opt_state, critic, critic_opt_state), (loss, diag["clip_fraction"])

    def epoch(carry, epoch_key):
        order = jax.random.permutation(epoch_key, config.batch_size).reshape(config.ppo_minibatches, size)
        return jax.lax.scan(minibatch, carry, order)

    carry = (state.params, state.opt_state, extras.critic, extras.critic_opt_state)
    carry, (losses, clip_fracs) = jax.lax.scan(epoch, carry, jax.random.split(perm_key, config.ppo_epochs))
    params, opt_state, critic, critic_opt_state = carry

    kl_batch = jnp.mean(jnp.sum(old_logp - ref_logp, 1))
    update_kl = ppo.adaptive_kl_update if config.kl_controller == "adaptive" else ppo.fixed_kl_update
    kl_state = update_kl(extras.kl, kl_batch, config.kl_target, config.kl_gain)
    new_state = state._replace(params=params, opt_state=opt_state, log_z=log_z, key=key, step=state.step + 1,
                               proposal_params=params,
                               extra=PPOExtras(critic=critic, critic_opt_state=critic_opt_state, kl=kl_state))
    return new_state, dict(loss=jnp.mean(losses), log_Z_estimate=log_Z, clip_fraction=jnp.mean(clip_fracs))
