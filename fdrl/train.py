"""f-DPG on a language model: the train state, the jitted update, and the loop.

Per step: draw contexts, sample completions from the proposal with the KV-cache
sampler, decode and score them on the host, then one jitted update that scores
the reference (teacher forcing), updates log Z (per context for conditional
targets) and the baseline, and applies `fdpg_loss` through optax. The sampler's
log-probs are reused as the proposal's: the proposal is never re-scored.

Off-policy (`config.proposal = "offpolicy"`): samples come from a frozen copy q,
importance-weighted by π/q; q is replaced by π when π is estimated closer to p
(KL(p‖·) by self-normalised IS on the batch), the DPG rule.

Everything that resuming needs is in `LMTrainState` (params, optimiser, q,
log Z, baseline, PRNG key, step) and is saved with orbax; prompt choice and
sampling draw from the state's key, so `--config.resume` continues exactly.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fdrl import (data, divergences, estimators, host_memory, interrupt, metrics, optim, ppo, sampling, scorers,
                  sharding)
from fdrl.config_checks import check_choice, check_float_dtype, check_int, check_number
from fdrl.checkpoint import (checkpoint_manager, claim_workdir, require_checkpoint, restore_checkpoint, restore_fields,
                             save_checkpoint, saved_steps)
from fdrl.losses import fdpg_loss
from fdrl.optim import make_optimizer
from fdrl.models import gguf_loader, llama, quant, tokenizer as tokenizer_lib
from fdrl.sampling import Sampler

Array = jax.Array
PROPOSALS = ("policy", "offpolicy")


class LMTrainState(NamedTuple):
    params: nnx.State
    opt_state: optax.OptState
    proposal_params: Optional[nnx.State]  # None when on-policy
    log_z: estimators.LogZState
    baseline: estimators.BaselineState
    key: Array
    step: Array
    kl: Optional[object] = None  # ppo.KLControllerState for algo = "ppo"


ALGOS = ("fdpg", "ppo", "fppo")
TARGET_KINDS = ("pointwise", "rlhf", "distributional")


class Task(NamedTuple):
    """What the config describes, built once: model, tokenizer, prompts, target."""

    graphdef: object
    ref_params: nnx.State
    model_config: llama.LlamaConfig
    tokenizer: tokenizer_lib.Tokenizer
    prompts: list
    prompt_tokens: np.ndarray  # [K, P] left-padded
    prompt_valid: np.ndarray  # [K, P]
    target: scorers.TextTarget
    sampler: Sampler


# --- building -------------------------------------------------------------------

def build_model(config, shardings=None):
    """(graphdef, params, model config, tokenizer) for config.model: "smollm2" (GGUF) or
    "tiny" (random, SmolLM2's tokenizer). `shardings` (abstract State -> shardings)
    places the parameters on a mesh as they are created or loaded."""
    value_head = config.algo != "fdpg"  # PPO's critic
    if config.model == "smollm2":
        model, tok = gguf_loader.load_gguf(config.get("gguf_path") or None, param_dtype=config.param_dtype,
                                           compute_dtype=config.compute_dtype, value_head=value_head,
                                           shardings=shardings, remat=config.get("remat", False),
                                           logits_chunk=config.get("logits_chunk", 1024),
                                           quantized=config.get("quantized_reference", False))
        graphdef, params = nnx.split(model)
        return graphdef, params, model.config, tok
    if config.model == "tiny":
        tok = gguf_loader.load_tokenizer(config.get("gguf_path") or None)
        model_config = llama.LlamaConfig.tiny(vocab_size=tok.vocab_size, param_dtype=config.param_dtype,
                                              compute_dtype=config.compute_dtype, value_head=value_head,
                                              remat=config.get("remat", False),
                                              logits_chunk=config.get("logits_chunk", 1024))
        graphdef, params = sharding.init_model_params(
            lambda: llama.Llama(model_config, rngs=nnx.Rngs(config.model_seed)), shardings)
        return graphdef, params, model_config, tok
    raise ValueError(f"unknown model={config.model!r}; choose 'smollm2' or 'tiny'")


def build_target(config) -> scorers.TextTarget:
    t = config.target
    scorer = scorers.make_scorer(t.scorer, **{k: t[k] for k in ("words", "pattern", "unit") if k in t})
    if t.kind == "pointwise":
        return scorers.TextTarget([scorers.PointwiseTerm(scorer, log_floor=t.log_b_floor)])
    if t.kind == "rlhf":
        return scorers.TextTarget([scorers.RewardTerm(scorer, beta=t.beta)])
    if t.kind == "distributional":
        return scorers.TextTarget([scorers.DistributionalTerm([scorer], mu_bar=tuple(t.mu_bar))])
    raise ValueError(f"unknown target.kind={t.kind!r}; choose one of {TARGET_KINDS}")


def validate(config) -> None:
    """Raises ValueError naming the first bad field (by its flag path) before anything loads."""
    divergences.get_divergence(config.f, alpha=config.get("alpha"))
    check_number(config, "max_abs_u", low=0, low_open=True)
    check_choice(config, "algo", ALGOS)
    check_choice(config, "model", ("smollm2", "tiny"))
    check_float_dtype(config, "param_dtype")
    check_float_dtype(config, "compute_dtype")
    check_choice(config, "remat", tuple(llama.REMAT_POLICIES) + (True, False))
    for field in ("logits_chunk", "decode_column_blocks", "num_prompts", "num_logged_samples"):
        check_int(config, field, low=0)
    if "decode_transposed_layers" in config:
        check_choice(config, "decode_transposed_layers", tuple(TRANSPOSED_LAYERS))
    check_choice(config, "target.kind", TARGET_KINDS)
    if config.target.kind == "rlhf":
        check_number(config, "target.beta", low=0, low_open=True)
    if config.target.kind == "distributional":
        check_int(config, "target.fit_batches", low=1)
    check_choice(config, "proposal", PROPOSALS)
    check_choice(config, "baseline", estimators.BASELINES)
    check_number(config, "baseline_decay", low=0, high=1, high_open=True)
    check_int(config, "baseline_window", low=1)
    check_int(config, "batch_size", low=2)
    micro = check_int(config, "microbatch_size", low=0) if "microbatch_size" in config else 0
    if micro and config.batch_size % micro:
        raise ValueError(f"microbatch_size={micro} must be 0 (the whole batch at once) or divide "
                         f"batch_size={config.batch_size}")
    check_int(config, "max_new_tokens", low=1)
    check_number(config, "temperature", low=0)
    check_int(config, "top_k", low=0)
    check_number(config, "top_p", low=0, high=1, low_open=True)
    if config.algo != "fdpg":
        check_int(config, "ppo.epochs", low=1)
        check_int(config, "ppo.minibatches", low=1)
        if config.batch_size % config.ppo.minibatches:
            raise ValueError(f"batch_size={config.batch_size} must be divisible by "
                             f"ppo.minibatches={config.ppo.minibatches}")
        minibatch = config.batch_size // config.ppo.minibatches
        if micro and minibatch > micro and minibatch % micro:
            raise ValueError(f"microbatch_size={micro} must divide a PPO minibatch (or be at least one): "
                             f"batch_size/ppo.minibatches = {config.batch_size}/{config.ppo.minibatches} = {minibatch}")
        check_number(config, "ppo.clip_eps", low=0, high=1, low_open=True, high_open=True)
        check_choice(config, "ppo.aggregation", ppo.AGGREGATIONS)
        check_number(config, "ppo.gamma", low=0, high=1)
        check_number(config, "ppo.gae_lambda", low=0, high=1)
        check_number(config, "ppo.vf_coef", low=0)
        check_number(config, "ppo.value_clip", low=0)
        if config.algo == "ppo":
            check_number(config, "ppo.kl_beta", low=0, low_open=True)
            check_choice(config, "ppo.kl_controller", ("fixed", "adaptive"))
            check_number(config, "ppo.kl_target", low=0, low_open=True)
            check_number(config, "ppo.kl_gain", low=0)
    optim.check_config(config)
    check_int(config, "log_every", low=1)
    check_int(config, "eval_every", low=1)
    check_int(config, "checkpoint_every", low=0)  # 0 = never
    if "save_on_signal" in config:
        check_choice(config, "save_on_signal", (True, False))
    check_int(config, "eval_batch_size", low=1)
    chunk = check_int(config, "eval_chunk", low=0) if "eval_chunk" in config else 0
    if chunk and config.eval_batch_size % chunk:
        raise ValueError(f"eval_chunk={chunk} must be 0 (all at once) or divide eval_batch_size="
                         f"{config.eval_batch_size}")


def eval_chunk_size(config) -> int:
    """Samples per sampler call in evaluation and λ fitting: config.eval_chunk; 0 = the
    training microbatch where one is set and divides eval_batch_size (a run that samples
    in microbatches to save memory evaluates in them too), else all at once."""
    if config.get("eval_chunk", 0):
        return config.eval_chunk
    micro = config.get("microbatch_size", 0)
    return micro if micro and config.eval_batch_size % micro == 0 else config.eval_batch_size


def build_task(config, mesh=None, rules=None) -> Task:
    """Model, tokenizer, prompts, target and sampler; on `mesh` (with parsed `rules`) the
    reference parameters are loaded onto their shards and the sampler keeps the batch split."""
    validate(config)
    prompts = load_config_prompts(config)  # before the model loads: a wrong source fails at once
    shardings = None if mesh is None else functools.partial(sharding.param_shardings, mesh=mesh, rules=rules)
    graphdef, ref_params, model_config, tok = build_model(config, shardings)
    sampler = make_sampler(config, graphdef, model_config, tok, mesh, rules)
    prompt_tokens, prompt_valid = encode_prompts(config, tok, sampler, prompts)
    return Task(graphdef, ref_params, model_config, tok, prompts, prompt_tokens, prompt_valid,
                build_target(config), sampler)


def load_config_prompts(config, limit: Optional[int] = None) -> list[str]:
    """The prompts `config.prompts` names (`config.num_prompts` of them, or `limit`), read from
    a TFDS dataset's `prompts_split` / `prompts_field` in `prompts_data_dir` where it is one."""
    return data.load_prompts(config.prompts, split=config.get("prompts_split", "train"),
                             field=config.get("prompts_field", "prompt"),
                             data_dir=config.get("prompts_data_dir", "") or None,
                             limit=limit or config.get("num_prompts") or None)


def encode_prompts(config, tok, sampler: Sampler, prompts) -> tuple[np.ndarray, np.ndarray]:
    """User prompts as the sampler's left-padded ([K, P] tokens, valid), in the config's chat
    template and system prompt (chat_template=False: the texts as they are)."""
    system = config.get("system_prompt") or None
    texts = [tokenizer_lib.chat_prompt(p, system=system) if config.chat_template else p for p in prompts]
    return sampler.pad(tok.encode_batch(texts))


# config.decode_transposed_layers -> Sampler(transposed_layers=)
TRANSPOSED_LAYERS = {"auto": None, "on": True, "off": False}


def make_sampler(config, graphdef, model_config, tok, mesh=None, rules=None) -> Sampler:
    return Sampler(graphdef, model_config, max_new_tokens=config.max_new_tokens, eos_id=tok.eos_id,
                   pad_id=tok.pad_id, top_k=config.top_k, column_blocks=config.get("decode_column_blocks") or None,
                   transposed_layers=TRANSPOSED_LAYERS[config.get("decode_transposed_layers", "auto")],
                   out_sharding=None if mesh is None else sharding.batch_sharding(mesh, rules, 2),
                   keep_states=reuses_sampler_states(config),
                   states_sharding=None if mesh is None else sharding.batch_sharding(mesh, rules, 4))


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


# --- the step ---------------------------------------------------------------------

def _is_pure_sampling(config) -> bool:
    return config.temperature == 1.0 and config.top_k == 0 and config.top_p == 1.0


def reuses_sampler_states(config) -> bool:
    """Whether the update differentiates the policy from the sampler's saved layer inputs
    (llama.continuation_logp_from_states) instead of a forward pass of its own: asked for
    (`config.reuse_sampler_states`) and possible, i.e. f-DPG drawing from π itself
    (on-policy, temperature 1, no top-k or top-p), so that the sampler ran π's forward, in
    one sampling call (with microbatches, every call's states would be held until the
    update: memory that grows with the whole batch)."""
    return (bool(config.get("reuse_sampler_states", False)) and config.algo == "fdpg"
            and config.proposal != "offpolicy" and _is_pure_sampling(config) and num_microbatches(config) == 1)


def sequence_logp(graphdef, params, prompt, prompt_valid, completion, mask) -> Array:
    """[B] teacher-forced log-probs of whole completions (llama.continuation_logp summed)."""
    return jnp.sum(llama.continuation_logp(graphdef, params, prompt, prompt_valid, completion, mask)[0], axis=1)


def num_microbatches(config) -> int:
    """How many microbatches of config.microbatch_size a step's batch is drawn and
    differentiated in (1: the whole batch at once)."""
    size = config.get("microbatch_size", 0)
    return config.batch_size // size if size else 1


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
    weighted = config.proposal == "offpolicy" or not _is_pure_sampling(config)
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
    ref_tok, _ = llama.continuation_logp(graphdef, ref_params, prompt, prompt_valid, completion, mask)
    ref_logp = jnp.sum(ref_tok, axis=1)
    proposal_logp = jnp.sum(sampler_logp, axis=1)
    log_P, log_z, log_Z = _estimates(config, state, ref_logp, log_potential, proposal_logp, context_ids)

    def loss_fn(params):
        if states is None:
            tok_logp, _ = llama.continuation_logp(graphdef, params, prompt, prompt_valid, completion, mask)
        else:
            tok_logp = llama.continuation_logp_from_states(graphdef, params, prompt, prompt_valid, completion, mask,
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
    sums (`llama.accumulate_continuation_grads`). The result is the whole batch's gradient,
    to float32 summation order; the update's memory is about that of a microbatch's update.
    """
    state = _advance_key(state)
    prompt, prompt_valid, completion, mask, sampler_logp, log_potential, context_ids = (
        jnp.stack(x) for x in (prompt, prompt_valid, completion, mask, sampler_logp, log_potential, context_ids))
    micro, size = completion.shape[:2]
    batch = (prompt, prompt_valid, completion, mask)  # [M, b, ...]

    ref_logp = _map_microbatches(functools.partial(sequence_logp, graphdef, ref_params), batch)
    proposal_logp = jnp.sum(sampler_logp, axis=2).reshape(-1)
    if config.proposal != "offpolicy" and _is_pure_sampling(config):
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
        return llama.accumulate_continuation_grads(graphdef, state.params, *microbatch, token_cotangent, grads), None

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
    at a time (`llama.accumulate_loss_grads`: each layer's gradient added into float32 sums).
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
        scored = functools.partial(llama.continuation_logp, graphdef, params)
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
                tok, values = llama.continuation_logp(graphdef, params, *(x[idx] for x in batch[:4]))
                return weighted_loss(tok, values, idx, minibatch_tokens)

            (loss, (v_loss, clip)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        else:  # each chunk's layer gradients added into float32 sums as they are made
            def accumulate(carry, rows):
                sums, totals = carry
                sums, out = llama.accumulate_loss_grads(
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


class Trainer:
    """The built task on a device mesh, and the jitted update; `step` and `evaluate` are the loop's parts.

    The mesh and the rules come from `config.mesh`. The update is compiled once with
    in/out shardings over the whole train state and donates the old state.
    """

    def __init__(self, config, task: Optional[Task] = None):
        self.config = config
        validate(config)
        self.mesh = sharding.mesh_from_config(config.mesh)
        self.rules = sharding.parse_rules(config.mesh.rules)
        for field, size in (("batch_size", config.batch_size), ("eval_batch_size", config.eval_batch_size),
                            ("eval_chunk", eval_chunk_size(config)),
                            ("microbatch_size", config.batch_size // num_microbatches(config))):
            sharding.check_batch(self.mesh, self.rules, size, f"{field}={size}")
        if task is None:
            task = build_task(config, self.mesh, self.rules)
        else:  # a task built elsewhere: its sampler must return batches split over this mesh
            task = task._replace(sampler=make_sampler(config, task.graphdef, task.model_config, task.tokenizer,
                                                      self.mesh, self.rules))
        parts = build_step(config, task.graphdef, task.ref_params, len(task.prompts), self.mesh, self.rules)
        # A no-op when build_task placed them; a task built elsewhere moves onto this mesh.
        self.task = task._replace(ref_params=jax.device_put(task.ref_params, parts.ref_shardings))
        self.optimizer, self.param_shardings, self.state_shardings = (parts.optimizer, parts.param_shardings,
                                                                      parts.state_shardings)
        self.abstract_state, self._init, self._update = parts.abstract_state, parts.init, parts.update
        self._ref_logp = jax.jit(functools.partial(sequence_logp, self.task.graphdef))

    def init_state(self) -> LMTrainState:
        return self._init(self.task.ref_params)

    def shard_batch(self, *arrays):
        return sharding.shard_batch(self.mesh, self.rules, *arrays)

    def fit_target(self, key: Array) -> Optional[dict]:
        """Fits λ of distributional terms on samples from the base model a."""
        if not self.task.target.needs_fit:
            return None
        texts = []
        for i in range(self.config.target.fit_batches):
            _, _, out, _ = self.sample(self.task.ref_params, jax.random.fold_in(key, i), eval_chunk_size(self.config))
            texts += self.decode(out)
        fit = [t.fit(texts) for t in self.task.target.terms if isinstance(t, scorers.DistributionalTerm)][0]
        return dict(lam=np.asarray(fit.lam).tolist(), moments=np.asarray(fit.moments).tolist(), num_samples=len(texts))

    def sample(self, params, key, batch_size, temperature=None, top_p=None):
        """Draws contexts and samples completions; returns (prompt, valid, SampleOutput, context ids),
        all split over the mesh's batch axes."""
        k_ctx, k_sample = jax.random.split(key)
        ctx = np.asarray(jax.random.randint(k_ctx, (batch_size,), 0, len(self.task.prompts)), np.int32)
        prompt, valid, k_sample, ctx_ids = self._sampler_args(ctx, k_sample)
        out = self.task.sampler(params, prompt, valid, k_sample,
                                temperature=self.config.temperature if temperature is None else temperature,
                                top_p=self.config.top_p if top_p is None else top_p)
        return prompt, valid, out, ctx_ids

    def _sampler_args(self, ctx: np.ndarray, key: Array):
        prompt, valid, ctx_ids = self.shard_batch(self.task.prompt_tokens[ctx], self.task.prompt_valid[ctx], ctx)
        return prompt, valid, self._replicated_key(key), ctx_ids

    def _replicated_key(self, key: Array) -> Array:
        # A key made on the host and one split from the train state (replicated over the
        # mesh) differ in sharding: the sampler would compile once for each.
        return jax.device_put(key, sharding.replicated(self.mesh))

    def compile(self) -> None:
        """Compiles what a run calls (the update, the sampler at the training and evaluation
        batch sizes, reference scoring, and the base-model sampler when λ is fitted) from
        abstract train-state shapes, before any train state exists. XLA's compiler needs
        0.2–0.4 GB for each of these on SmolLM2; compiled first, that comes on top of the
        reference alone, not of the policy and Adam moments too. Later calls with arrays of
        the same shapes reuse the executables (jit's cache), so this only moves work earlier."""
        c, policy = self.config, self.abstract_state.params

        def batch(size):
            prompt, valid, key, ctx = self._sampler_args(np.zeros(size, np.int32), jax.random.PRNGKey(0))
            n = c.max_new_tokens
            tokens, mask = self.shard_batch(np.zeros((size, n), np.int32), np.ones((size, n), bool))
            return prompt, valid, key, ctx, tokens, mask

        micro = num_microbatches(c)
        size = c.batch_size // micro
        prompt, valid, key, ctx, tokens, mask = batch(size)
        logp, log_potential = self.shard_batch(np.zeros(tokens.shape, np.float32), np.zeros(size, np.float32))
        states = ((states_shape(c, self.task.model_config, prompt.shape[1], size, self.mesh, self.rules),)
                  if reuses_sampler_states(c) else ())
        args = (prompt, valid, tokens, mask, logp, log_potential, ctx)
        self._update.lower(self.task.ref_params, self.abstract_state,
                           *(args if micro == 1 else ((a,) * micro for a in args)), *states).compile()
        self.task.sampler.lower(policy, prompt, valid, key, c.temperature, c.top_p).compile()
        prompt, valid, key, ctx, tokens, mask = batch(eval_chunk_size(c))
        self.task.sampler.lower(policy, prompt, valid, key, 1.0, 1.0).compile()  # evaluate
        self._ref_logp.lower(self.task.ref_params, prompt, valid, tokens, mask).compile()
        if c.top_k:
            self._ref_logp.lower(policy, prompt, valid, tokens, mask).compile()
        if self.task.target.needs_fit:
            self.task.sampler.lower(self.task.ref_params, prompt, valid, key, c.temperature, c.top_p).compile()
        host_memory.release_free_heap()  # the compiler's freed memory (~0.8 GB), before the state is made

    def generate(self, params, prompts: Sequence[str], key: Array, num_samples: int = 1,
                 temperature: Optional[float] = None, top_p: Optional[float] = None) -> list[dict]:
        """`num_samples` completions of each of `prompts` (user texts, given the config's chat
        template and system prompt), drawn from `params` at the config's temperature and
        top-p unless given. One record per completion, prompt by prompt: prompt, completion,
        score (the target's scorer), log_potential, and the completion's log-probabilities
        under `params` (policy_logp, untruncated) and under the base model a (ref_logp)."""
        if not prompts or num_samples < 1:
            raise ValueError(f"generate needs prompts and num_samples >= 1, got {len(prompts)} prompts and "
                             f"num_samples={num_samples}")
        c = self.config
        tokens, valid = encode_prompts(c, self.task.tokenizer, self.task.sampler, prompts)
        rows = np.repeat(np.arange(len(prompts)), num_samples)
        shards = sharding.batch_shards(self.mesh, self.rules)
        padded = np.concatenate([rows, np.full(-len(rows) % shards, rows[-1])])  # whole batch shards
        prompt, prompt_valid = self.shard_batch(tokens[padded], valid[padded])
        out = self.task.sampler(params, prompt, prompt_valid, self._replicated_key(key),
                                temperature=c.temperature if temperature is None else temperature,
                                top_p=c.top_p if top_p is None else top_p)
        completions = self.decode(out)[:len(rows)]
        # Teacher-forced, so that log π is the policy's own even where top-k/top-p truncated the draw.
        policy_logp, ref_logp = (sharding.to_host(self._ref_logp(p, prompt, prompt_valid, out.tokens, out.mask))
                                 for p in (params, self.task.ref_params))
        scores = np.asarray(self.task.target.score(completions), np.float32)
        # None where a distributional term has no λ yet (no run restored, none fitted).
        log_potential = (None if self.task.target.needs_fit else
                         np.asarray(self.task.target.log_potential(completions), np.float32))
        return [dict(prompt=prompts[r], completion=t, score=float(scores[i]),
                     log_potential=None if log_potential is None else float(log_potential[i]),
                     policy_logp=float(policy_logp[i]), ref_logp=float(ref_logp[i]))
                for i, (r, t) in enumerate(zip(rows, completions))]

    def decode(self, out) -> list[str]:
        return self.task.tokenizer.decode_batch(sharding.to_host(out.tokens), sharding.to_host(out.mask))

    def score(self, out) -> Array:
        """Log-potentials [B] of sampled completions: decoded and scored on the host, then split
        over the mesh like the rest of the batch."""
        return self.score_texts(self.decode(out))

    def score_texts(self, texts: list[str]) -> Array:
        """Log-potentials [B] of decoded completions, split over the mesh."""
        return self.shard_batch(np.asarray(self.task.target.log_potential(texts), np.float32))

    def step(self, state: LMTrainState):
        """Samples, scores on the host, then the jitted update (which advances state.key)."""
        step_key = jax.random.split(state.key)[1]
        sampler_params = state.params if state.proposal_params is None else state.proposal_params
        batch = self.step_batch(sampler_params, step_key)
        # The sampler's freed buffers back to the OS before the update allocates its own
        # (glibc keeps ~1 GB of them otherwise: fdrl.host_memory).
        host_memory.release_free_heap()
        return self._update(self.task.ref_params, state, *batch)

    def step_batch(self, sampler_params, key: Array) -> tuple:
        """A step's samples, scored: the update's arguments after the train state. With
        microbatches (config.microbatch_size), one sampling call each (microbatch i from key
        fold_in(key, i)), every argument a tuple of them."""
        micro = num_microbatches(self.config)
        size = self.config.batch_size // micro
        parts = []
        for i in range(micro):  # one microbatch keeps the key: the same samples as before microbatches existed
            prompt, valid, out, ctx = self.sample(sampler_params, key if micro == 1 else jax.random.fold_in(key, i),
                                                  size)
            parts.append(self.update_batch(prompt, valid, out, self.score(out), ctx))  # score waits for the sampler
        return parts[0] if micro == 1 else tuple(zip(*parts))

    def update_batch(self, prompt, valid, out, log_potential, ctx) -> tuple:
        """The update's arguments after the train state, from a sampling call and its scores:
        the sampler's states last when the update reuses them (reuses_sampler_states)."""
        states = (out.states,) if reuses_sampler_states(self.config) else ()
        return (prompt, valid, out.tokens, out.mask, out.logp, log_potential, ctx, *states)

    def evaluate(self, state: LMTrainState, key: Array) -> tuple[dict, list[str], list[str]]:
        """Metrics from eval_batch_size fresh pure samples of π (temperature 1), drawn
        eval_chunk at a time: estimates named in fdrl.metrics."""
        size, chunk = self.config.eval_batch_size, eval_chunk_size(self.config)
        policy_logp, ref_logp, ctx, texts = [], [], [], []
        for i in range(size // chunk):  # one chunk keeps the key: the same samples as before chunks existed
            prompt, valid, out, ctx_i = self.sample(state.params, key if chunk == size else jax.random.fold_in(key, i),
                                                    chunk, temperature=1.0, top_p=1.0)
            texts += self.decode(out)
            if self.config.top_k:  # the sampler's log-probs are of the truncated distribution: re-score π
                policy_logp.append(self._ref_logp(state.params, prompt, valid, out.tokens, out.mask))
            else:
                policy_logp.append(out.logp)  # [B, N]: summed in _eval_estimates
            ref_logp.append(self._ref_logp(self.task.ref_params, prompt, valid, out.tokens, out.mask))
            ctx.append(ctx_i)
        host = [np.concatenate([sharding.to_host(a) for a in arrays]) for arrays in (policy_logp, ref_logp, ctx)]
        policy_logp, ref_logp, ctx = self.shard_batch(*host)
        result = {k: float(v) for k, v in _eval_estimates(state.log_z, policy_logp, ref_logp, self.score_texts(texts),
                                                          ctx if self.config.conditional else None).items()}
        log_Z = result.pop("log_Z")
        result["alignment"] = float(np.mean(self.task.target.score(texts)))
        result["log_Z"] = log_Z
        result.update(metrics.diversity(texts))
        prompts = [self.task.prompts[int(i)] for i in host[2]]  # the context ids, already gathered
        return result, prompts, texts


@jax.jit
def _eval_estimates(log_z_state, policy_logp: Array, ref_logp: Array, log_potential: Array, context) -> dict:
    """Trainer.evaluate's estimates as one program: policy_logp [B] or per token [B, N],
    ref_logp and log_potential [B], context [B] or None. Op by op, a multi-process run
    queued a dozen multi-device programs unawaited, and two processes deadlocked in
    XLA's CPU collectives (tests/test_multihost.py)."""
    if policy_logp.ndim == 2:
        policy_logp = jnp.sum(policy_logp, axis=1)
    log_P = ref_logp + log_potential
    # The eval samples join (a copy of) the running estimate: Ẑ is unbiased at
    # every step, step 0 included, and training's state is left as it was.
    log_Z = estimators.log_z_value(estimators.log_z_update(log_z_state, log_P, policy_logp, context), context)
    return dict(metrics.divergence_estimates(policy_logp, log_P, log_Z, ref_logp), log_Z=jnp.mean(log_Z))


def restore_run(trainer: "Trainer", manager=None, step: Optional[int] = None,
                params_only: bool = False) -> LMTrainState:
    """The train state a run saved in config.workdir (the latest checkpoint, or `step`),
    restored straight onto this trainer's mesh, which may differ from the one that saved
    it; a fitted λ (target.json) goes back into the target's distributional terms. With
    params_only, only params and step are read (the rest is None): a policy to sample,
    without the optimiser's moments (for SmolLM2 0.8 GB less)."""
    workdir = trainer.config.workdir
    require_checkpoint(workdir, step, manager)  # before making a manager, which would create its folders
    manager = manager if manager is not None else checkpoint_manager(workdir)
    state = (restore_fields(manager, trainer.abstract_state, ("params", "step"), step) if params_only
             else restore_checkpoint(manager, trainer.abstract_state, step))
    target_file = os.path.join(workdir, "target.json")
    lam = json.load(open(target_file)).get("lam") if os.path.exists(target_file) else None
    if lam is not None:
        for t in trainer.task.target.terms:
            if isinstance(t, scorers.DistributionalTerm):
                t.lam = np.asarray(lam, np.float32)
    return state


# --- the loop ---------------------------------------------------------------------

class _Writers:
    """metrics.jsonl and TensorBoard event files in the workdir."""

    def __init__(self, workdir: str, append: bool):
        os.makedirs(workdir, exist_ok=True)
        # A resumed run continues its log; a fresh run starts a new one.
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a" if append else "w")
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:  # TensorBoard is optional; JSONL always works
            self._tb = None

    def write(self, step: int, kind: str, values: dict, samples: Optional[list] = None):
        record = dict(step=step, kind=kind, **values)
        if samples is not None:
            record["samples"] = samples
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{kind}/{k}", v, step)
            if samples:
                self._tb.add_text(f"{kind}/samples", "\n\n".join(samples[:4]), step)

    def close(self):
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class _NoWriters:
    def write(self, *args, **kwargs):
        pass

    def close(self):
        pass


def _quiet(*args, **kwargs):
    pass


def train_and_evaluate(config, task: Optional[Task] = None, log=print) -> dict:
    """Runs (or resumes) training; returns {"history": [...eval dicts], "state": final state, ...}.

    The workdir is claimed (`checkpoint.claim_workdir`: one run at a time) and checked for
    earlier checkpoints before the model loads, so either mistake costs seconds, not a compile.
    """
    validate(config)
    main_process = jax.process_index() == 0  # multi-host: every process trains, one logs and writes files
    with claim_workdir(config.workdir) if main_process else contextlib.nullcontext():
        steps = saved_steps(config.workdir)
        if steps and not config.resume:
            raise FileExistsError(f"{config.workdir} already holds checkpoints up to step {steps[-1]}: pass "
                                  "--config.resume=True to continue them, or choose another --config.workdir")
        latest = steps[-1] if steps else None
        return _train_and_evaluate(config, task, log if main_process else _quiet, main_process, latest)


def _train_and_evaluate(config, task: Optional[Task], log, main_process: bool, latest: Optional[int]) -> dict:
    """The run, in a workdir already claimed and listed: `latest` is its last saved step (or None)."""
    from tqdm import tqdm

    trainer = Trainer(config, task)
    trainer.compile()  # before the train state exists: compile memory on top of the reference alone
    workdir = config.workdir
    os.makedirs(workdir, exist_ok=True)
    manager = checkpoint_manager(workdir)  # orbax: every process writes its own shards
    target_file = os.path.join(workdir, "target.json")

    if config.resume and latest is None:
        log(f"resume requested but {workdir} holds no checkpoint: starting from step 0")
    if config.resume and latest is not None:
        state = restore_run(trainer, manager)
        log(f"resumed from step {int(state.step)} in {workdir}")
    else:
        state = trainer.init_state()
        fit = trainer.fit_target(jax.random.PRNGKey(config.seed + 1))
        if fit is not None:  # every process fits the same λ on the same (gathered) samples
            log(f"fitted λ={fit['lam']} on {fit['num_samples']} base samples (moments {fit['moments']})")
            if main_process:
                json.dump(fit, open(target_file, "w"))

    writers = _Writers(workdir, append=int(state.step) > 0) if main_process else _NoWriters()
    eval_key = jax.random.PRNGKey(config.seed + 2)
    history, last_samples = [], []

    def run_eval():
        values, prompts, texts = trainer.evaluate(state, jax.random.fold_in(eval_key, int(state.step)))
        samples = [f"[{p}] → {t}" for p, t in zip(prompts, texts)][:config.num_logged_samples]
        writers.write(int(state.step), "eval", values, samples)
        history.append(dict(step=int(state.step), **values))
        last_samples[:] = samples
        return values, samples

    if int(state.step) == 0:
        values, samples = run_eval()
        log("samples before training:\n  " + "\n  ".join(samples))
    start = time.time()
    # Ctrl-C or SIGTERM between or during steps: finish the step, save it, then stop
    # (one process; several rely on JAX's preemption service, which agrees on a step).
    saves_on_stop = bool(config.checkpoint_every) and config.get("save_on_signal", True)
    multi_process = jax.process_count() > 1
    stop = interrupt.StopRequest(enabled=saves_on_stop and not multi_process)
    with stop, tqdm(total=config.steps, initial=int(state.step),
                    disable=not (config.progress_bar and main_process), desc="f-DPG") as bar:
        while int(state.step) < config.steps:
            state, scalars = trainer.step(state)
            scalars = {k: float(v) for k, v in scalars.items()}  # blocks on the step: no runaway dispatch
            host_memory.release_free_heap()  # the update's freed buffers, before the next sampling
            for k, v in scalars.items():
                # log Ẑ = −inf is exact while no sample has met a hard constraint.
                if not np.isfinite(v) and not (k == "log_Z" and v == -np.inf):
                    raise FloatingPointError(f"{k} became {v} at step {int(state.step)}")
            step = int(state.step)
            bar.update(1)
            bar.set_postfix(loss=f"{scalars['loss']:.3g}", logZ=f"{scalars['log_Z']:.3g}")
            if step % config.log_every == 0:
                writers.write(step, "train", scalars)
            if step % config.eval_every == 0 or step == config.steps:
                run_eval()
            saved = config.checkpoint_every and (step % config.checkpoint_every == 0 or step == config.steps)
            if saved:
                save_checkpoint(manager, state)
            if saves_on_stop and step < config.steps and (  # (the last step ends the run anyway)
                    stop.requested or (multi_process and manager.reached_preemption(step))):
                if not saved:
                    save_checkpoint(manager, state)
                writers.close()
                raise stop.exit_exception(f"stopped after step {step} and saved it in {workdir}: "
                                          "--config.resume=True continues from there")
    writers.close()
    return dict(history=history, state=state, seconds=time.time() - start, samples=last_samples, trainer=trainer)
