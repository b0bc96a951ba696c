"""What an LM config describes, checked and built: the model, tokenizer, prompts, target
and sampler (`build_task`), and the config's answers to what a step does (how many
microbatches, whether the update reuses the sampler's states).

`validate(config)` names the first bad field by its flag path before anything loads;
`build_task` reads the prompts before the model, so a wrong source fails in seconds.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import numpy as np
from flax import nnx

from fdrl import data, divergences, estimators, optim, ppo, scorers, sharding
from fdrl.config_checks import check_choice, check_float_dtype, check_int, check_number
from fdrl.models import gguf_loader, llama, tokenizer as tokenizer_lib
from fdrl.sampling import Sampler

PROPOSALS = ("policy", "offpolicy")
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


def is_pure_sampling(config) -> bool:
    """Whether the sampler draws from the model itself: temperature 1, no top-k or top-p."""
    return config.temperature == 1.0 and config.top_k == 0 and config.top_p == 1.0


def reuses_sampler_states(config) -> bool:
    """Whether the update differentiates the policy from the sampler's saved layer inputs
    (logprobs.continuation_logp_from_states) instead of a forward pass of its own: asked for
    (`config.reuse_sampler_states`) and possible, i.e. f-DPG drawing from π itself
    (on-policy, temperature 1, no top-k or top-p), so that the sampler ran π's forward, in
    one sampling call (with microbatches, every call's states would be held until the
    update: memory that grows with the whole batch)."""
    return (bool(config.get("reuse_sampler_states", False)) and config.algo == "fdpg"
            and config.proposal != "offpolicy" and is_pure_sampling(config) and num_microbatches(config) == 1)


def num_microbatches(config) -> int:
    """How many microbatches of config.microbatch_size a step's batch is drawn and
    differentiated in (1: the whole batch at once)."""
    size = config.get("microbatch_size", 0)
    return config.batch_size // size if size else 1
