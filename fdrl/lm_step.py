"""The LM train state and its jitted update: f-DPG on the whole batch (`update`), in
microbatches (`accumulated_update`), and PPO / f-PPO (`ppo_update`), built once over a
device mesh with in/out shardings and the old state donated (`build_step`).

Each update is a pure function of (reference params, train state, a step's batch): it
scores the reference, updates log Z (per context for conditional targets) and the
baseline, differentiates the loss and applies optax. The sampler's log-probs are the
proposal's: the proposal is never re-scored.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fdrl import divergences, estimators, ppo, sampling, sharding
from fdrl.losses import fdpg_loss
from fdrl.lm_task import is_pure_sampling, num_microbatches, reuses_sampler_states
from fdrl.models import llama, logprobs, quant
from fdrl.optim import make_optimizer

Array = jax.Array


class LMTrainState(NamedTuple):
    """Everything a run needs to continue exactly: saved whole by orbax."""

    params: nnx.State
    opt_state: optax.OptState
    proposal_params: Optional[nnx.State]  # None when on-policy
    log_z: estimators.LogZState
    baseline: estimators.BaselineState
    key: Array
    step: Array
    kl: Optional[object] = None  # ppo.KLControllerState for algo = "ppo"


def init_state(config, num_contexts: int, optimizer, ref_params) -> LMTrainState:
    """The initial train state as a pure function of the reference parameters (jitted
    with out_shardings by the Trainer, so it is created on its shards)."""
    # The policy gets its own float buffers (the update donates them; the reference stays,
    # and may be quantised: config.quantized_reference).
    params = quant.dequantize_tree(ref_params, jnp.dtype(config.param_dtype))
    return LMTrainState(
        params=params,
        opt_state=optimizer.init(params),
        proposal_params=jax.tree.map(jnp.copy, params) if config.proposal == "offpolicy" else None,
        log_z=estimators.log_z_init(num_contexts if config.conditional else None),
        baseline=estimators.baseline_init(config.baseline_window),
        key=jax.random.PRNGKey(config.seed),
        step=jnp.array(0, jnp.int32),
        kl=ppo.kl_controller_init(config.ppo.kl_beta) if config.algo == "ppo" else None,
    )


def state_shardings(abstract_state: LMTrainState, optimizer, params_shardings, mesh) -> LMTrainState:
    """Shardings of every leaf of the train state: parameters (and the proposal) by the
    rules, optimiser state like its parameters, everything else replicated."""
    rep = sharding.replicated(mesh)

    def replicate(tree):
        return jax.tree.map(lambda _: rep, tree)

    return LMTrainState(
        params=params_shardings,
        opt_state=sharding.optimizer_shardings(optimizer, abstract_state.opt_state, params_shardings, mesh),
        proposal_params=None if abstract_state.proposal_params is None else params_shardings,
        log_z=replicate(abstract_state.log_z), baseline=replicate(abstract_state.baseline),
        key=rep, step=rep, kl=None if abstract_state.kl is None else replicate(abstract_state.kl))


def _advance_key(state: LMTrainState) -> LMTrainState:
    """The state's key moves on once per step; split(key)[1] drew that step's samples."""
    return state._replace(key=jax.random.split(state.key)[0])


# --- the update ---------------------------------------------------------------------

def sequence_logp(graphdef, params, prompt, prompt_valid, completion, mask) -> Array:
    """[B] teacher-forced log-probs of whole completions (logprobs.continuation_logp summed)."""
    return jnp.sum(logprobs.continuation_logp(graphdef, params, prompt, prompt_valid, completion, mask)[0], axis=1)


def _map_microbatches(fn, stacked: tuple):
    """fn(*arrays) over arrays stacked [M, b, ...], a microbatch at a time (lax.map: one
    microbatch's activations live at once); its outputs with those axes merged, [M·b, ...]."""
    out = jax.lax.map(lambda rows: fn(*rows), stacked)
    return jax.tree.map(lambda y: y.reshape(-1, *y.shape[2:]), out)


def _zero_sums(params):
    """float32 zeros like params: gradient sums over microbatches or chunks."""
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)


def _as_param_dtypes(sums, params):
    """The sums cast back to the parameters' dtypes: the gradient the optimiser takes."""
    return jax.tree.map(lambda g, p: g.astype(p.dtype), sums, params)


def _estimates(config, state: LMTrainState, ref_logp, log_potential, proposal_logp, context_ids):
    """log P [B], and log Z's running state and value with this batch in it."""
    log_P = ref_logp + log_potential
    ctx = context_ids if config.conditional else None
    log_z = estimators.log_z_update(state.log_z, log_P, proposal_logp, ctx)
    return log_P, log_z, estimators.log_z_value(log_z, ctx)


def _fdpg_batch_loss(config, state: LMTrainState, policy_logp, log_P, proposal_logp, log_Z):
    """fdpg_loss on the step's whole batch [B]: (loss, diagnostics)."""
    # Importance weights are needed whenever the sampling distribution is not π itself.
    weighted = config.proposal == "offpolicy" or not is_pure_sampling(config)
    return fdpg_loss(divergences.get_divergence(config.f, alpha=config.get("alpha")), policy_logp, log_P=log_P,
                     proposal_logp=proposal_logp if weighted else None, log_Z=log_Z,
                     baseline=functools.partial(estimators.compute_baseline, config.baseline, state.baseline),
                     max_abs_u=config.max_abs_u)


def _apply_gradients(config, optimizer, state: LMTrainState, grads, loss, diag, policy_logp, ref_logp, log_P,
                     proposal_logp, log_z, log_Z, mask):
    """The optimiser step, DPG's proposal swap and the estimators' states: (state, scalars)."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    proposal_params, swapped = state.proposal_params, jnp.array(False)
    if config.proposal == "offpolicy":
        # DPG: q ← π when KL(p‖π) < KL(p‖q), both by SNIS over the batch drawn from q.
        snis = jax.nn.softmax(estimators.log_target_weights(log_P, proposal_logp))
        kl_p_pi = -jnp.sum(jnp.where(snis > 0, snis * policy_logp, 0.0))  # up to the same constant
        kl_p_q = -jnp.sum(jnp.where(snis > 0, snis * proposal_logp, 0.0))
        swapped = kl_p_pi < kl_p_q
        proposal_params = jax.tree.map(lambda new, old: jnp.where(swapped, new, old), params, state.proposal_params)

    batch_mean = estimators.weighted_mean(diag["pseudo_reward"], diag["importance_weight"])
    state = LMTrainState(params=params, opt_state=opt_state, proposal_params=proposal_params, log_z=log_z,
                         baseline=estimators.baseline_update(state.baseline, batch_mean, config.baseline_decay),
                         key=state.key, step=state.step + 1)
    scalars = dict(loss=loss, log_Z=jnp.mean(log_Z), pseudo_reward=jnp.mean(diag["pseudo_reward"]),
                   importance_weight_max=jnp.max(diag["importance_weight"]), proposal_swapped=swapped,
                   kl_pi_a_batch=jnp.mean(policy_logp - ref_logp),
                   completion_tokens=jnp.sum(mask) / policy_logp.shape[0])
    return state, scalars


def update(config, graphdef, optimizer, ref_params, state: LMTrainState, prompt, prompt_valid, completion, mask,
           sampler_logp, log_potential, context_ids, states=None):
    """The jitted part of a step. Returns (state, scalars). `states`: the sampler's
    (reuses_sampler_states), which replace the policy's forward pass."""
    state = _advance_key(state)
    ref_tok, _ = logprobs.continuation_logp(graphdef, ref_params, prompt, prompt_valid, completion, mask)
    ref_logp = jnp.sum(ref_tok, axis=1)
    proposal_logp = jnp.sum(sampler_logp, axis=1)
    log_P, log_z, log_Z = _estimates(config, state, ref_logp, log_potential, proposal_logp, context_ids)

    def loss_fn(params):
        if states is None:
            tok_logp, _ = logprobs.continuation_logp(graphdef, params, prompt, prompt_valid, completion, mask)
        else:
            tok_logp = logprobs.continuation_logp_from_states(graphdef, params, prompt, prompt_valid, completion, mask,
                                                           states, sampler_logp)
        policy_logp = jnp.sum(tok_logp, axis=1)
        loss, diag = _fdpg_batch_loss(config, state, policy_logp, log_P, proposal_logp, log_Z)
        return loss, (diag, policy_logp)

    (loss, (diag, policy_logp)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return _apply_gradients(config, optimizer, state, grads, loss, diag, policy_logp, ref_logp, log_P, proposal_logp,
                            log_z, log_Z, mask)


def accumulated_update(config, graphdef, optimizer, ref_params, state: LMTrainState, prompt, prompt_valid,
                       completion, mask, sampler_logp, log_potential, context_ids):
    """`update` for a batch drawn in M microbatches (config.microbatch_size): each argument
    after the state is a tuple of M arrays [b, ...], one per sampling call.

    The estimators need the whole batch (log Z, the baseline, the importance weights'
    normalisation), so this runs in two passes, each over one microbatch at a time:
    (1) sequence log-probs under the reference, and under π unless the sampler drew from
    π itself (on-policy at temperature 1, whose log-probs are π's); then `fdpg_loss` on all
    B = M·b of them, whose gradient with respect to the vector log π [B] is exact, since the
    loss is linear in log π (the coefficients are stop-gradients); (2) the parameters'
    gradient Σ_i ∂loss/∂log π_i · ∇ log π_i, a microbatch at a time: a forward pass keeps
    each layer's input and the backward pass adds each layer's gradient into the float32
    sums (`logprobs.accumulate_continuation_grads`). The result is the whole batch's gradient,
    to float32 summation order; the update's memory is about that of a microbatch's update.
    """
    state = _advance_key(state)
    prompt, prompt_valid, completion, mask, sampler_logp, log_potential, context_ids = (
        jnp.stack(x) for x in (prompt, prompt_valid, completion, mask, sampler_logp, log_potential, context_ids))
    micro, size = completion.shape[:2]
    batch = (prompt, prompt_valid, completion, mask)  # [M, b, ...]

    ref_logp = _map_microbatches(functools.partial(sequence_logp, graphdef, ref_params), batch)
    proposal_logp = jnp.sum(sampler_logp, axis=2).reshape(-1)
    if config.proposal != "offpolicy" and is_pure_sampling(config):
        policy_logp = proposal_logp
    else:
        policy_logp = _map_microbatches(functools.partial(sequence_logp, graphdef, state.params), batch)
    log_P, log_z, log_Z = _estimates(config, state, ref_logp, log_potential.reshape(-1), proposal_logp,
                                     context_ids.reshape(-1))
    (loss, diag), dloss_dlogp = jax.value_and_grad(
        lambda logp: _fdpg_batch_loss(config, state, logp, log_P, proposal_logp, log_Z), has_aux=True)(policy_logp)

    def accumulate(grads, xs):  # each layer's gradient is added into the sums as it is made
        microbatch, coeff = xs
        token_cotangent = jnp.broadcast_to(coeff[:, None], microbatch[2].shape)
        return logprobs.accumulate_continuation_grads(graphdef, state.params, *microbatch, token_cotangent, grads), None

    sums, _ = jax.lax.scan(accumulate, _zero_sums(state.params), (batch, dloss_dlogp.reshape(micro, size)))
    grads = _as_param_dtypes(sums, state.params)
    return _apply_gradients(config, optimizer, state, grads, loss, diag, policy_logp, ref_logp, log_P, proposal_logp,
                            log_z, log_Z, mask)


def ppo_update(config, graphdef, optimizer, ref_params, state: LMTrainState, prompt, prompt_valid, completion, mask,
               sampler_logp, log_potential, context_ids):
    """PPO-RLHF (algo="ppo") or f-PPO (algo="fppo") on the rollouts of one step.

    Rewards per token (fdrl.ppo), GAE with the value head, then `ppo.epochs` ×
    `ppo.minibatches` clipped updates of policy and value head as a lax.scan.

    With microbatches (config.microbatch_size = b), each argument after the state is a
    tuple of M arrays [b, ...], one per sampling call: the rollouts are scored b rows at a
    time, and the gradient of a minibatch of more than b rows is accumulated over its rows b
    at a time (`logprobs.accumulate_loss_grads`: each layer's gradient added into float32 sums).
    A chunk's losses are weighted by its share of the minibatch (of its real tokens for
    token means, of its rows for sequence means), so their sum is the minibatch's loss and
    gradient.
    """
    state = _advance_key(state)
    pc = config.ppo
    micro = num_microbatches(config)
    arrays = (prompt, prompt_valid, completion, mask, sampler_logp, log_potential, context_ids)
    if micro > 1:
        arrays = tuple(jnp.stack(x) for x in arrays)  # [M, b, ...]: each sampling call's rows
    prompt, prompt_valid, completion, mask, sampler_logp, log_potential, context_ids = arrays

    def score(params):  # per-token log-probs and values [B, T], a sampling call's rows at a time
        scored = functools.partial(logprobs.continuation_logp, graphdef, params)
        args = (prompt, prompt_valid, completion, mask)
        return scored(*args) if micro == 1 else _map_microbatches(scored, args)

    ref_tok, _ = score(ref_params)
    old_tok, old_values = jax.lax.stop_gradient(score(state.params))
    if micro > 1:
        prompt, prompt_valid, completion, mask, sampler_logp, log_potential, context_ids = (
            x.reshape(-1, *x.shape[2:]) for x in arrays)
    log_P = jnp.sum(ref_tok, 1) + log_potential
    ctx = context_ids if config.conditional else None
    log_z = estimators.log_z_update(state.log_z, log_P, jnp.sum(sampler_logp, 1), ctx)
    log_Z = estimators.log_z_value(log_z, ctx)
    kl_state = state.kl
    if config.algo == "ppo":  # score = β·log-potential: r(x) for an RLHF target
        score = ppo.rlhf_score(log_potential, kl_state.beta, config.max_abs_u)
        rewards = ppo.rlhf_token_rewards(old_tok, ref_tok, score, mask, kl_state.beta)
    else:
        rewards = ppo.fppo_token_rewards(config.f, jnp.sum(old_tok, 1), log_P, log_Z, mask,
                                         alpha=config.get("alpha"), max_abs_u=config.max_abs_u)
    advantages, returns = ppo.gae(rewards, old_values, mask, pc.gamma, pc.gae_lambda)
    if pc.whiten_advantages:
        advantages = ppo.whiten(advantages, mask)
    batch = (prompt, prompt_valid, completion, mask, old_tok, old_values, advantages, returns)
    size = config.batch_size // pc.minibatches
    chunks = max(size * micro // config.batch_size, 1)  # a minibatch's chunks of at most b rows

    def weighted_loss(tok, values, rows, minibatch_tokens):
        """The minibatch's loss restricted to `rows` ([B, T] log-probs and values of those
        rows), weighted by their share of it: (loss, (value loss, clip fraction))."""
        _, _, _, m, old, old_v, adv, ret = (x[rows] for x in batch)
        policy_loss, diag = ppo.ppo_policy_loss(tok, old, adv, m, pc.clip_eps, pc.aggregation)
        v_loss = ppo.value_loss(values, old_v, ret, m, pc.value_clip)
        token_share = jnp.sum(m) / jnp.maximum(minibatch_tokens, 1)  # masked means: 0 where no token
        policy_share = token_share if pc.aggregation == "token_mean" else rows.shape[0] / size
        loss = policy_share * policy_loss + pc.vf_coef * token_share * v_loss
        return loss, (token_share * v_loss, token_share * diag["clip_fraction"])

    def minibatch(carry, idx):
        params, opt_state = carry
        minibatch_tokens = jnp.sum(batch[3][idx])
        if chunks == 1:
            def loss_fn(params):
                tok, values = logprobs.continuation_logp(graphdef, params, *(x[idx] for x in batch[:4]))
                return weighted_loss(tok, values, idx, minibatch_tokens)

            (loss, (v_loss, clip)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        else:  # each chunk's layer gradients added into float32 sums as they are made
            def accumulate(carry, rows):
                sums, totals = carry
                sums, out = logprobs.accumulate_loss_grads(
                    graphdef, params, *(x[rows] for x in batch[:4]),
                    functools.partial(weighted_loss, rows=rows, minibatch_tokens=minibatch_tokens), sums)
                return (sums, jax.tree.map(jnp.add, totals, out)), None

            zero = jnp.zeros((), jnp.float32)
            init = (_zero_sums(params), (zero, (zero, zero)))
            (sums, (loss, (v_loss, clip))), _ = jax.lax.scan(accumulate, init, idx.reshape(chunks, -1))
            grads = _as_param_dtypes(sums, params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (loss, v_loss, clip)

    def epoch(carry, key):
        order = jax.random.permutation(key, config.batch_size).reshape(pc.minibatches, size)
        return jax.lax.scan(minibatch, carry, order)

    perm_key = jax.random.fold_in(state.key, 7)
    (params, opt_state), (losses, v_losses, clips) = jax.lax.scan(
        epoch, (state.params, state.opt_state), jax.random.split(perm_key, pc.epochs))
    kl_batch = jnp.mean(jnp.sum(jnp.where(mask, old_tok - ref_tok, 0.0), 1))
    if kl_state is not None and pc.kl_controller == "adaptive":
        kl_state = ppo.adaptive_kl_update(kl_state, kl_batch, pc.kl_target, pc.kl_gain)
    state = state._replace(params=params, opt_state=opt_state, log_z=log_z, step=state.step + 1, kl=kl_state)
    scalars = dict(loss=jnp.mean(losses), value_loss=jnp.mean(v_losses), clip_fraction=jnp.mean(clips),
                   log_Z=jnp.mean(log_Z), kl_pi_a_batch=kl_batch, reward=jnp.mean(jnp.sum(rewards, 1)),
                   completion_tokens=jnp.mean(jnp.sum(mask, 1)))
    if kl_state is not None:
        scalars["kl_beta"] = kl_state.beta
    return state, scalars


# The update's arguments after (reference params, train state): name, rank, dtype.
# Every one is split along its leading batch axis.
UPDATE_BATCH = (("prompt", 2, jnp.int32), ("prompt_valid", 2, jnp.bool_), ("completion", 2, jnp.int32),
                ("mask", 2, jnp.bool_), ("sampler_logp", 2, jnp.float32), ("log_potential", 1, jnp.float32),
                ("context_ids", 1, jnp.int32))


class StepParts(NamedTuple):
    """What the update needs on a mesh, derived once from the parameters' (abstract) shapes."""

    optimizer: optax.GradientTransformation
    param_shardings: object  # nnx.State of NamedShardings (of the float policy)
    ref_shardings: object  # the reference's: as param_shardings, Quantized weights replicated
    state_shardings: LMTrainState  # of NamedShardings
    abstract_state: LMTrainState  # ShapeDtypeStructs carrying state_shardings: a restore target
    init: object  # jitted ref_params -> LMTrainState, created on its shards
    update: object  # jitted update: (ref_params, state, *UPDATE_BATCH[, states]) -> (state, scalars);
    # with microbatches (num_microbatches > 1) each UPDATE_BATCH argument is a tuple of them


def update_compiler_options(config, mesh) -> Optional[dict]:
    """XLA options for compiling the update. On CPU, `config.memory_scheduler` swaps XLA's
    default instruction order, which favours running independent ops concurrently, for its
    memory-minimising one. The default order, for one, zero-fills the layers' gradient
    buffers before the forward pass and holds them through the logits' backward pass: on
    SmolLM2 at batch 32 × 32 the update's temporaries go from 1.09 GB to 0.81 GB (with
    `chunked_token_logp`'s backward), at the same speed on 2 cores."""
    if config.get("memory_scheduler", False) and mesh.devices.flat[0].platform == "cpu":
        return sampling.CPU_LOW_MEMORY_OPTIONS
    return None


def build_step(config, graphdef, params, num_contexts: int, mesh, rules) -> StepParts:
    """The optimiser, every sharding of the train state, and the update compiled once over
    the mesh (in/out shardings, the old state donated). `params` are the reference's (may
    be abstract, may hold quant.Quantized weights)."""
    optimizer = make_optimizer(config)
    params_shardings = sharding.param_shardings(quant.float_shapes(params), mesh, rules)
    ref_shardings = quant.replicate_quantized(params_shardings, params, sharding.replicated(mesh))
    init = functools.partial(init_state, config, num_contexts, optimizer)
    abstract = jax.eval_shape(init, params)
    train_state_shardings = state_shardings(abstract, optimizer, params_shardings, mesh)
    batch_shardings = tuple(sharding.batch_sharding(mesh, rules, rank) for _, rank, _ in UPDATE_BATCH)
    if reuses_sampler_states(config):  # the sampler's SampleOutput.states, [B, L + 1, slots, D]
        batch_shardings += (sharding.batch_sharding(mesh, rules, 4),)
    update_fn = (ppo_update if config.algo != "fdpg" else
                 accumulated_update if num_microbatches(config) > 1 else update)
    jitted_update = jax.jit(functools.partial(update_fn, config, graphdef, optimizer),
                            in_shardings=(ref_shardings, train_state_shardings, *batch_shardings),
                            out_shardings=(train_state_shardings, sharding.replicated(mesh)), donate_argnums=(1,),
                            compiler_options=update_compiler_options(config, mesh))
    return StepParts(optimizer, params_shardings, ref_shardings, train_state_shardings,
                     sharding.with_shardings(abstract, train_state_shardings),
                     jax.jit(init, out_shardings=train_state_shardings), jitted_update)


def lower_update(config, model_config: llama.LlamaConfig, mesh, rules, prompt_len: int, num_contexts: int = 1):
    """The update for `model_config` lowered from abstract shapes alone: no parameter is
    ever allocated, so a model far larger than this machine compiles
    (`.compile().memory_analysis()` then gives the bytes per device)."""
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: llama.Llama(model_config, rngs=nnx.Rngs(0))))
    parts = build_step(config, graphdef, abstract_params, num_contexts, mesh, rules)
    micro = num_microbatches(config)
    b = config.batch_size // micro
    batch = []
    for name, rank, dtype in UPDATE_BATCH:
        width = prompt_len if name.startswith("prompt") else config.max_new_tokens
        shape = (b, width) if rank == 2 else (b,)
        array = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, rules, rank))
        batch.append(array if micro == 1 else (array,) * micro)
    if reuses_sampler_states(config):
        batch.append(states_shape(config, model_config, prompt_len, b, mesh, rules))
    return parts.update.lower(sharding.with_shardings(abstract_params, parts.param_shardings), parts.abstract_state,
                              *batch)


def states_shape(config, model_config: llama.LlamaConfig, prompt_len: int, batch: int, mesh, rules):
    """The sampler's SampleOutput.states as the update receives them (abstract)."""
    states = sampling.states_shape(model_config, batch, prompt_len, config.max_new_tokens)
    return jax.ShapeDtypeStruct(states.shape, states.dtype, sharding=sharding.batch_sharding(mesh, rules, 4))
