"""Per-token log-probs of completions under the Llama decoder, and their gradients written
for memory: teacher forcing (`continuation_logp`), the same from the sampler's saved layer
inputs (`continuation_logp_from_states`), and gradients added a layer at a time into
float32 sums (`accumulate_continuation_grads` for a loss linear in the log-probs,
`accumulate_loss_grads` for any loss of the per-token log-probs and values).

Log-probs are float32 whatever the compute dtype. The output projection's logits are made
`LlamaConfig.logits_chunk` positions at a time (`chunked_token_logp`; 0 = all at once),
each chunk recomputed in the backward pass: below B·N positions, the whole [B, N, V]
logits never exist.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fdrl.models import kernels
from fdrl.models.llama import (Array, LlamaConfig, _attention, _heads_major, _layer, _rms_norm, _rotary_and_mask,
                               _value_estimates, token_logp_from_logits)


@jax.custom_vjp
def _projected_token_logp(hidden: Array, out_w: Array, targets: Array) -> Array:
    """token_logp_from_logits(hidden @ out_w, targets): hidden [..., D], out_w [D, V],
    targets [...] int → [...] float32, with a backward pass written for memory (below)."""
    return token_logp_from_logits(kernels.output_logits(hidden, out_w), targets)


def _projected_token_logp_fwd(hidden, out_w, targets):
    logits = kernels.output_logits(hidden, out_w)
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return chosen - log_norm, (hidden, out_w, targets, logits, log_norm)


def _projected_token_logp_bwd(residuals, g):
    """Written for memory. The logits' cotangent g·(onehot(target) − softmax) is one
    elementwise pass over the logits (autodiff makes a scatter of g and a
    transposed copy: two more [..., V] buffers). Both projections' gradients are made
    from it at once (`_output_projection_grads`)."""
    hidden, out_w, targets, logits, log_norm = residuals
    d_logits = _logits_cotangent(logits, log_norm, targets, g).astype(out_w.dtype)
    d_hidden, d_out_w = _output_projection_grads(hidden, d_logits, kernels.transposed(out_w))
    return d_hidden, d_out_w.astype(out_w.dtype), None


def _logits_cotangent(logits: Array, log_norm: Array, targets: Array, g: Array) -> Array:
    """d/d logits of Σ g · (logits[target] − log_norm): logits [..., V], the rest [...]."""
    onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
    return g[..., None] * (onehot - jnp.exp(logits - log_norm[..., None]))


def _output_operands(out_w: Array) -> tuple:
    """out_w [D, V] and its transpose [V, D] as the output projection's products take them
    (`kernels.transposed`: float32 as they are, low precision on CPU row-major copies). Make them
    once per call."""
    return kernels.transposed(out_w.T), kernels.transposed(out_w)


def _output_projection_grads(hidden: Array, d_logits: Array, w_vd: Array):
    """The gradients of the output projection logits = hidden @ out_w from their cotangent:
    hidden [..., D], d_logits [..., V], w_vd = out_w.T [V, D] (`_output_operands`) →
    d_hidden [..., D] in hidden's dtype, d_out_w [D, V] float32.

    d_hidden is made to depend on d_out_w: XLA otherwise defers the weights' gradient past
    the layers' backward pass, holding the [..., V] cotangent through all of it. (An
    optimization_barrier does not hold: XLA on CPU expands it away before ordering the
    instructions.)"""
    hidden_t = kernels.transposed(hidden.reshape(-1, hidden.shape[-1]))
    d_out_w = kernels.dot_f32(hidden_t, d_logits.reshape(-1, d_logits.shape[-1]))
    d_hidden = kernels.dot_f32(d_logits, w_vd)
    d_hidden = (d_hidden + 0 * d_out_w[0, 0]).astype(hidden.dtype)  # the ordering dependency (0·x: XLA keeps it)
    return d_hidden, d_out_w


_projected_token_logp.defvjp(_projected_token_logp_fwd, _projected_token_logp_bwd)


def chunked_token_logp(hidden: Array, out_w: Array, targets: Array, chunk: int) -> Array:
    """log softmax(hidden @ out_w)[targets], `chunk` positions of logits at a time.

    hidden [B, N, D], out_w [D, V], targets [B, N] int → [B, N] float32.
    The full [B, N, V] logits (and, under grad, their softmax and cotangent) never
    exist: a scan over chunks of the N axis, each recomputed in the backward pass
    (jax.checkpoint), holds one [B, chunk / B, V] block at a time. The batch axis
    stays whole, so a batch split over a mesh stays split. chunk = 0: all at once.
    """
    b, n, d = hidden.shape
    if targets.shape != (b, n):
        raise ValueError(f"targets {targets.shape} must be [B, N] = {(b, n)} to match hidden {hidden.shape}")
    per_chunk = _positions_per_chunk(b, n, chunk)

    def block(h, t):
        return _projected_token_logp(h, out_w, t)

    if per_chunk == n:
        return block(hidden, targets)
    xs = (_to_chunks(hidden, per_chunk), _to_chunks(targets, per_chunk))
    _, logp = jax.lax.scan(jax.checkpoint(lambda _, ht: (None, block(*ht)), prevent_cse=False), None, xs)
    return _from_chunks(logp, n)


def _positions_per_chunk(batch: int, n: int, chunk: int) -> int:
    """Positions along N per block of `chunk` logits rows (the batch stays whole); 0 = all."""
    return n if chunk <= 0 else max(1, min(n, chunk // batch))


def _to_chunks(x: Array, per_chunk: int) -> Array:
    """[B, N, ...] → [num, B, per_chunk, ...], N zero-padded to a multiple of per_chunk."""
    b, n = x.shape[:2]
    num = -(-n // per_chunk)
    x = jnp.pad(x, ((0, 0), (0, num * per_chunk - n)) + ((0, 0),) * (x.ndim - 2))
    return x.reshape(b, num, per_chunk, *x.shape[2:]).swapaxes(0, 1)


def _from_chunks(x: Array, n: int) -> Array:
    """The inverse of `_to_chunks`: [num, B, per_chunk, ...] → [B, n, ...]."""
    num, b, per_chunk = x.shape[:3]
    return x.swapaxes(0, 1).reshape(b, num * per_chunk, *x.shape[3:])[:, :n]


def continuation_logp(graphdef, params, prompt: Array, prompt_valid: Array, completion: Array,
                      completion_mask: Array):
    """Teacher-forced per-token log-probs of a completion given a left-padded prompt.

    Args:
      prompt: [B, P] left-padded prompt tokens; prompt_valid [B, P].
      completion: [B, N] generated tokens; completion_mask [B, N] (False after EOS).

    Returns:
      (token_logp [B, N] float32, 0 where masked; values [B, N] or None: the
      value head's estimate at each completion token's *input* state, i.e. V(s_t)
      read before token t is chosen).
    """
    tokens = jnp.concatenate([prompt, completion], axis=1)
    valid = jnp.concatenate([prompt_valid, completion_mask], axis=1)
    p = prompt.shape[1]
    # Logits at slot i predict slot i + 1: only slots p − 1 … p + N − 2 are needed.
    model = nnx.merge(graphdef, params)
    out = model(tokens[:, :-1], valid[:, :-1], logits_start=p - 1, with_logits=False)
    token_logp = chunked_token_logp(out.hidden, model.output_weights(), completion, model.config.logits_chunk)
    return jnp.where(completion_mask, token_logp, 0.0), out.values


def continuation_logp_from_states(graphdef, params, prompt: Array, prompt_valid: Array, completion: Array,
                                  completion_mask: Array, states: Array, token_logp: Array) -> Array:
    """`continuation_logp(...)[0]` of a completion the sampler drew from these params at
    temperature 1 (no truncation), without running the model forward.

    The sampler's log-probs `token_logp` [B, N] are the values (they equal teacher
    forcing's within float rounding). The gradient with respect to `params` is teacher
    forcing's, computed from the sampler's `states` [B, L + 1, P + N − 1, D] (each layer's
    input at every slot it read, and the last layer's output: `Sampler(keep_states=True)`):
    each layer's backward pass recomputes that layer from its input, as the layer scan
    does under `remat="full"`, but the forward pass that would remake those inputs is
    the sampling already done. `states` and `token_logp` get no gradient.
    """
    _check_states(prompt, completion, states, token_logp)
    return _logp_from_states(graphdef, params, prompt, prompt_valid, completion, completion_mask, states,
                             token_logp)


def _check_states(prompt, completion, states, token_logp):
    b, n = completion.shape
    slots = prompt.shape[1] + n - 1
    if token_logp.shape != (b, n):
        raise ValueError(f"token_logp {token_logp.shape} must be [B, N] = {(b, n)} like completion")
    if states.ndim != 4 or states.shape[0] != b or states.shape[2] != slots:
        raise ValueError(f"states {states.shape} must be [B, L + 1, P + N - 1, D] with B = {b} and "
                         f"P + N - 1 = {slots} (prompt {prompt.shape}, completion {completion.shape})")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _logp_from_states(graphdef, params, prompt, prompt_valid, completion, completion_mask, states, token_logp):
    return jnp.where(completion_mask, token_logp, 0.0)


def _logp_from_states_fwd(graphdef, params, prompt, prompt_valid, completion, completion_mask, states,
                          token_logp):
    out = jnp.where(completion_mask, token_logp, 0.0)
    return out, (params, prompt, prompt_valid, completion, completion_mask, states)


def _logp_from_states_bwd(graphdef, residuals, g):
    params, prompt, prompt_valid, completion, completion_mask, states = residuals
    d_params = _grads_from_states(graphdef, params, prompt, prompt_valid, completion, completion_mask, states, g)
    return d_params, None, None, None, None, None, None


_LAYER_NAMES = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")  # _stacked_layers


def _grads_from_states(graphdef, params, prompt, prompt_valid, completion, completion_mask, states, g, into=None,
                       value_cotangent=None):
    """Gradient of Σ g · token_logp [B, N] (+ Σ value_cotangent · values [B, N], where given)
    with respect to params, from the layers' inputs `states` [B, L + 1, P + N − 1, D]: each
    layer's vjp at its input. With `into` (a float32 tree like params), returns into + that
    gradient, each layer's gradient added into its slice of the stacked sums as the layer
    scan goes: no second params-sized buffer for the new gradient (gradient accumulation)."""
    model = nnx.merge(graphdef, params)
    c = model.config
    cdt = jnp.dtype(c.compute_dtype)
    tokens, layer = _teacher_forcing_layer(c, prompt, prompt_valid, completion, completion_mask)
    start = prompt.shape[1] - 1  # slot whose logits predict the first completion token
    g = jnp.where(completion_mask, g, 0.0)

    # The head: final norm, then the output projection a chunk at a time (three matmuls
    # per chunk: logits, and the two products of their cotangent).
    final_norm = model.final_norm[...]
    x_top = states[:, -1, start:].astype(cdt)
    hidden, norm_vjp = jax.vjp(lambda x, s: _rms_norm(x, s.astype(cdt), c.norm_eps), x_top, final_norm)
    out_w = model.output_weights()
    d_hidden, d_out_w = _token_logp_grads(hidden, out_w, completion, g, c.logits_chunk)
    grads = {}
    if value_cotangent is not None:
        if model.value_w is None:
            raise ValueError("value_cotangent given, but the model has no value head (LlamaConfig.value_head)")
        _, values_vjp = jax.vjp(_value_estimates, hidden, model.value_w[...], model.value_b[...])
        d_hidden_values, grads["value_w"], grads["value_b"] = values_vjp(
            jnp.where(completion_mask, value_cotangent, 0.0).astype(jnp.float32))
        d_hidden = d_hidden + d_hidden_values.astype(d_hidden.dtype)
    d_x_top, d_final_norm = norm_vjp(d_hidden.astype(hidden.dtype))
    d_x = jnp.zeros(states.shape[:1] + states.shape[2:], cdt).at[:, start:].set(d_x_top)

    # The layers, last to first: each layer's vjp at its input as the sampler saw it.
    def layer_grads(d_x, params_l, i):
        x_l = jax.lax.dynamic_index_in_dim(states, i, axis=1, keepdims=False).astype(cdt)
        _, layer_vjp = jax.vjp(lambda p, x: layer(x, p), params_l, x_l)
        d_params_l, d_x = layer_vjp(d_x)
        return d_x, d_params_l

    unroll = c.num_layers if c.unroll_layers else 1
    layer_index = jnp.arange(c.num_layers)
    if into is None:
        def back(d_x, xs):
            return layer_grads(d_x, *xs)

        d_x, d_layers = jax.lax.scan(back, d_x, (model._stacked_layers(), layer_index), reverse=True,
                                     unroll=unroll)
    else:
        def back_into(carry, xs):
            d_x, sums = carry
            i = xs[1]
            d_x, d_params_l = layer_grads(d_x, *xs)
            sums = tuple(jax.lax.dynamic_update_index_in_dim(
                total, jax.lax.dynamic_index_in_dim(total, i, keepdims=False) + d.astype(total.dtype), i, 0)
                for total, d in zip(sums, d_params_l))
            return (d_x, sums), None

        sums = tuple(into[name][...].reshape(w.shape) for name, w in zip(_LAYER_NAMES, model._stacked_layers()))
        (d_x, d_layers), _ = jax.lax.scan(back_into, (d_x, sums), (model._stacked_layers(), layer_index),
                                          reverse=True, unroll=unroll)

    embed = model.embed[...]
    d_embed = (jnp.zeros(embed.shape, jnp.float32) if into is None else into["embed"][...].reshape(embed.shape))
    d_embed = d_embed.at[tokens].add(d_x.astype(jnp.float32))
    grads.update(zip(_LAYER_NAMES, d_layers))
    grads["final_norm"] = d_final_norm
    if model.lm_head is None:
        d_embed = d_embed + d_out_w.T.astype(jnp.float32)
    else:
        grads["lm_head"] = d_out_w
    grads["embed"] = d_embed

    def grad_of(path, leaf):
        name = path[0].key if hasattr(path[0], "key") else str(path[0])
        if name in ("value_w", "value_b") and name not in grads:  # no value cotangent: the log-probs' gradient
            return jnp.zeros_like(leaf) if into is None else into[name][...]
        if name not in grads:
            raise ValueError(f"continuation_logp_from_states has no gradient for parameter {name!r}")
        if into is None:
            return grads[name].astype(leaf.dtype).reshape(leaf.shape)
        total = grads[name].reshape(leaf.shape)
        return total if name in _LAYER_NAMES or name == "embed" else into[name][...] + total.astype(jnp.float32)

    return jax.tree_util.tree_map_with_path(grad_of, params)


def accumulate_continuation_grads(graphdef, params, prompt: Array, prompt_valid: Array, completion: Array,
                                  completion_mask: Array, token_cotangent: Array, into):
    """into + ∇_params Σ token_cotangent · continuation_logp(...)[0], for gradient accumulation.

    A forward pass keeps each layer's input ([B, L + 1, P + N − 1, D], as the sampler's
    `states`), then the backward pass recomputes one layer at a time from them (the memory
    of remat="full") and adds each layer's gradient into its slice of `into` (a float32
    tree like params: the running sum over microbatches). token_cotangent [B, N]: for the
    gradient of Σ_i c_i · log π(x_i), c_i broadcast over x_i's tokens.
    """
    if token_cotangent.shape != completion.shape:
        raise ValueError(f"token_cotangent {token_cotangent.shape} must be [B, N] like completion "
                         f"{completion.shape}")
    states = jax.lax.stop_gradient(_teacher_forced_states(graphdef, params, prompt, prompt_valid, completion,
                                                          completion_mask))
    return _grads_from_states(graphdef, params, prompt, prompt_valid, completion, completion_mask, states,
                              token_cotangent.astype(jnp.float32), into=into)


def accumulate_loss_grads(graphdef, params, prompt: Array, prompt_valid: Array, completion: Array,
                          completion_mask: Array, loss_fn, into):
    """into + ∇_params loss_fn(token_logp, values)[0], where (token_logp, values) =
    continuation_logp(...): gradient accumulation for a loss that is not linear in the
    log-probs (PPO's clipped ratio, the value loss). loss_fn maps [B, N] log-probs (0 where
    masked) and [B, N] values (None without a value head) to (loss, aux).

    As in accumulate_continuation_grads, a forward pass keeps each layer's input; the head
    then makes the log-probs and values from the last layer's output (one more pass of the
    output projection), loss_fn's gradient with respect to them is the backward pass's
    cotangent, and each layer's gradient is added into `into` as it is made: no second
    params-sized buffer. Returns (into + gradient, (loss, aux)).
    """
    states = jax.lax.stop_gradient(_teacher_forced_states(graphdef, params, prompt, prompt_valid, completion,
                                                          completion_mask))
    model = nnx.merge(graphdef, params)
    c = model.config
    cdt = jnp.dtype(c.compute_dtype)
    hidden = _rms_norm(states[:, -1, prompt.shape[1] - 1:].astype(cdt), model.final_norm[...].astype(cdt), c.norm_eps)
    token_logp = chunked_token_logp(hidden, model.output_weights(), completion, c.logits_chunk)
    token_logp = jax.lax.stop_gradient(jnp.where(completion_mask, token_logp, 0.0))
    values = (None if model.value_w is None else
              jax.lax.stop_gradient(_value_estimates(hidden, model.value_w[...], model.value_b[...])))
    (loss, aux), (g, value_cotangent) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(token_logp, values)
    grads = _grads_from_states(graphdef, params, prompt, prompt_valid, completion, completion_mask, states, g,
                               into=into, value_cotangent=value_cotangent)
    return grads, (loss, aux)


def _teacher_forcing_layer(c: LlamaConfig, prompt, prompt_valid, completion, completion_mask):
    """The slots teacher forcing reads (tokens [B, P + N − 1]: the prompt, then every
    completion token but the last) and one decoder layer over them, `layer(x, params_l)`."""
    tokens = jnp.concatenate([prompt, completion], axis=1)[:, :-1]
    valid = jnp.concatenate([prompt_valid, completion_mask], axis=1)[:, :-1]
    cos, sin, mask = _rotary_and_mask(c, valid, 0, tokens.shape[1])
    attend = lambda q, k, v: (_attention(q, _heads_major(k), _heads_major(v), mask), None)
    return tokens, lambda x, params_l: _layer(c, x, params_l, attend, cos=cos, sin=sin)[0]


def _teacher_forced_states(graphdef, params, prompt, prompt_valid, completion, completion_mask) -> Array:
    """Each layer's input at every slot teacher forcing reads, and the last layer's output:
    [B, L + 1, P + N − 1, D] in the compute dtype (the sampler's `states` layout)."""
    model = nnx.merge(graphdef, params)
    c = model.config
    tokens, layer = _teacher_forcing_layer(c, prompt, prompt_valid, completion, completion_mask)

    def body(x, params_l):
        return layer(x, params_l), x

    x = model.embed[...][tokens].astype(jnp.dtype(c.compute_dtype))
    unroll = c.num_layers if c.unroll_layers else 1
    x, inputs = jax.lax.scan(body, x, model._stacked_layers(), unroll=unroll)
    return jnp.concatenate([inputs.swapaxes(0, 1), x[:, None]], axis=1)


_logp_from_states.defvjp(_logp_from_states_fwd, _logp_from_states_bwd)


def _token_logp_grads(hidden: Array, out_w: Array, targets: Array, g: Array, chunk: int):
    """Gradients of Σ g · log softmax(hidden @ out_w)[targets] with respect to hidden [B, N, D]
    and out_w [D, V], `chunk` positions of logits at a time (as `chunked_token_logp`)."""
    b, n, _ = hidden.shape
    per_chunk = _positions_per_chunk(b, n, chunk)
    xs = tuple(_to_chunks(x, per_chunk) for x in (hidden, targets, g))
    w_dv, w_vd = _output_operands(out_w)  # once for all chunks

    def block(d_out_w, xs):
        h_c, t_c, g_c = xs
        logits = kernels.dot_f32(h_c, w_dv)
        log_norm = jax.nn.logsumexp(logits, axis=-1)
        d_logits = _logits_cotangent(logits, log_norm, t_c, g_c).astype(out_w.dtype)
        d_h, d_w = _output_projection_grads(h_c, d_logits, w_vd)
        return d_out_w + d_w, d_h

    d_out_w, d_h = jax.lax.scan(block, jnp.zeros(out_w.shape, jnp.float32), xs)
    return _from_chunks(d_h, n), d_out_w
