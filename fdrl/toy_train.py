"""f-DPG on the exact toy problem: a jit-compiled train loop, vmapped over seeds.

Training sees sampled batches only (ancestral samples from the proposal, their
scores looked up like a scorer would compute them); the exact metrics of
`toy.exact_metrics` are taken every `eval_every` steps by enumeration.

    config = configs.toy.get_config()
    problem, target = make_task(config)
    history = run_seeds(config, problem, target)      # dict of [seeds, evals]
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fdrl import divergences, estimators, optim, toy, toy_ppo
from fdrl.config_checks import check_choice, check_int, check_number
from fdrl.losses import fdpg_loss
from fdrl.optim import make_optimizer

Array = jax.Array

PROPOSALS = ("policy", "lagged")
#: history key of log π over the whole support after training, [seeds, S] (not a time series).
FINAL_POLICY = "final_policy_logp"


class ToyTrainState(NamedTuple):
    params: dict
    opt_state: optax.OptState
    proposal_params: dict  # the proposal q (a lagged copy of π when off-policy)
    log_z: estimators.LogZState
    baseline: estimators.BaselineState
    key: Array
    step: Array
    extra: object = None  # algorithm-specific state (toy_ppo.PPOExtras for PPO)


def make_task(config) -> tuple[toy.ToyProblem, toy.ToyTarget]:
    """The toy problem and target a config describes."""
    problem = toy.make_problem(config.vocab_size, config.seq_len, seed=config.problem_seed)
    target = toy.make_target(problem, config.target, beta=config.beta, mu_bar=config.mu_bar,
                             log_floor=config.log_b_floor)
    return problem, target


def validate(config) -> None:
    """Raises ValueError naming the first bad field."""
    divergences.get_divergence(config.f, alpha=config.get("alpha"))
    check_number(config, "max_abs_u", low=0, low_open=True)
    check_choice(config, "algo", ("fdpg",) + toy_ppo.ALGOS)
    if config.algo != "fdpg":
        toy_ppo.validate(config)
    check_int(config, "vocab_size", low=2)
    check_int(config, "seq_len", low=1)
    check_choice(config, "target", toy.TARGETS)
    if config.target == "rlhf":
        check_number(config, "beta", low=0, low_open=True)
    if config.target == "distributional":  # φ is an indicator: E[φ] strictly inside (0, 1)
        check_number(config, "mu_bar", low=0, high=1, low_open=True, high_open=True)
    check_choice(config, "family", toy.FAMILIES)
    check_choice(config, "baseline", estimators.BASELINES)
    check_number(config, "baseline_decay", low=0, high=1, high_open=True)
    check_int(config, "baseline_window", low=1)
    check_choice(config, "proposal", PROPOSALS)
    check_int(config, "proposal_every", low=1)
    check_int(config, "batch_size", low=2)
    optim.check_config(config)
    check_int(config, "eval_every", low=1)
    check_int(config, "num_seeds", low=1)
    if config.steps % config.eval_every:
        raise ValueError(f"steps={config.steps} must be a multiple of eval_every={config.eval_every}")


def init_state(config, problem: toy.ToyProblem, optimizer, seed: Array) -> ToyTrainState:
    params = toy.init_policy(problem, config.family)
    return ToyTrainState(
        params=params,
        opt_state=optimizer.init(params),
        proposal_params=params,
        log_z=estimators.log_z_init(),
        baseline=estimators.baseline_init(config.baseline_window),
        key=jax.random.PRNGKey(seed),
        step=jnp.array(0, jnp.int32),
        extra=toy_ppo.init_extras(config, problem) if config.algo != "fdpg" else None,
    )


def train_step(config, problem: toy.ToyProblem, target: toy.ToyTarget, optimizer, state: ToyTrainState):
    """One f-DPG update from one sampled batch. Returns (state, scalars)."""
    div = divergences.get_divergence(config.f, alpha=config.get("alpha"))
    off_policy = config.proposal == "lagged"
    key, sample_key = jax.random.split(state.key)
    sampler_params = state.proposal_params if off_policy else state.params
    tokens, sampler_logp = toy.sample(problem, config.family, sampler_params, sample_key, config.batch_size)

    _, log_P = toy.score(problem, target, tokens)  # a table look-up stands in for a scorer
    log_z = estimators.log_z_update(state.log_z, log_P, sampler_logp)
    log_Z = estimators.log_z_value(log_z)
    baseline_fn = functools.partial(estimators.compute_baseline, config.baseline, state.baseline)

    def loss_fn(params):
        policy_logp = toy.sequence_logp(problem, config.family, params, tokens)
        return fdpg_loss(div, policy_logp, log_P=log_P, proposal_logp=sampler_logp if off_policy else None,
                         log_Z=log_Z, baseline=baseline_fn, max_abs_u=config.max_abs_u)

    (loss, diag), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    batch_mean_reward = estimators.weighted_mean(diag["pseudo_reward"], diag["importance_weight"])
    step = state.step + 1
    refresh = (step % config.proposal_every) == 0
    proposal_params = jax.tree.map(lambda new, old: jnp.where(refresh, new, old), params, state.proposal_params)
    new_state = ToyTrainState(
        params=params,
        opt_state=opt_state,
        proposal_params=proposal_params,
        log_z=log_z,
        baseline=estimators.baseline_update(state.baseline, batch_mean_reward, config.baseline_decay),
        key=key,
        step=step,
    )
    return new_state, dict(loss=loss, log_Z_estimate=log_Z)


def evaluate(config, problem, target, params) -> dict:
    """Exact metrics of π, plus D_f(π‖p) for the f being trained ("objective")."""
    policy_logp = toy.all_logp(problem, config.family, params)
    metrics = toy.exact_metrics(problem, target, policy_logp)
    div = divergences.get_divergence(config.f, alpha=config.get("alpha"))
    metrics["objective"] = divergences.exact_divergence(div, policy_logp, target.log_p)
    return metrics


def _one_batch_log_Z(config, problem, target, state: ToyTrainState) -> Array:
    """The log Z estimate from one batch of the initial proposal (step 0's value)."""
    key = jax.random.fold_in(state.key, 1)
    tokens, sampler_logp = toy.sample(problem, config.family, state.proposal_params, key, config.batch_size)
    _, log_P = toy.score(problem, target, tokens)
    return estimators.log_z_value(estimators.log_z_update(estimators.log_z_init(), log_P, sampler_logp))


def run(config, problem: toy.ToyProblem, target: toy.ToyTarget, seed: Array) -> dict:
    """One training run; returns exact metrics at steps 0, eval_every, ..., steps ([E+1] each)."""
    optimizer = make_optimizer(config)
    step_impl = train_step if config.algo == "fdpg" else toy_ppo.train_step
    step_fn = functools.partial(step_impl, config, problem, target, optimizer)
    state = init_state(config, problem, optimizer, seed)

    def eval_block(state, _):
        state, scalars = jax.lax.scan(lambda s, _: step_fn(s), state, None, length=config.eval_every)
        metrics = evaluate(config, problem, target, state.params)
        metrics["log_Z_estimate"] = scalars["log_Z_estimate"][-1]
        return state, metrics

    first = evaluate(config, problem, target, state.params)
    first["log_Z_estimate"] = _one_batch_log_Z(config, problem, target, state)
    final, history = jax.lax.scan(eval_block, state, None, length=config.steps // config.eval_every)
    history = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, history)
    history[FINAL_POLICY] = toy.all_logp(problem, config.family, final.params)
    return history


def run_seeds(config, problem: toy.ToyProblem | None = None, target: toy.ToyTarget | None = None) -> dict:
    """`config.num_seeds` runs at once (vmap). Returns dict of [seeds, E+1] arrays, "step" [E+1],
    and FINAL_POLICY: log π over the support after training, [seeds, S]."""
    validate(config)
    if problem is None or target is None:
        problem, target = make_task(config)
    seeds = config.seed + jnp.arange(config.num_seeds)
    history = jax.jit(jax.vmap(lambda s: run(config, problem, target, s)))(seeds)
    history = jax.tree.map(lambda x: jax.device_get(x), history)
    history["step"] = jnp.arange(0, config.steps + 1, config.eval_every)
    for name, values in history.items():
        if name not in ("kl_pi_p", FINAL_POLICY) and not bool(jnp.all(jnp.isfinite(values))):
            raise FloatingPointError(f"metric {name} became non-finite in run f={config.f}: {values}")
    return history


def summarise(history: dict) -> dict:
    """Final metrics as (mean, std) over seeds."""
    return {k: (float(jnp.mean(v[:, -1])), float(jnp.std(v[:, -1]))) for k, v in history.items()
            if k not in ("step", FINAL_POLICY)}


def format_mean_std(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "inf"
    return f"{mean:.4f} ± {std:.4f}"
