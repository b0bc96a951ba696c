"""What an LM config describes, checked before anything loads: every bad field named by its
flag path, every shipped config valid, and the config's answers to what a step does."""

import pytest

from configs import smollm2_gender, smollm2_sentiment, smollm2_word
from fdrl import lm_task


@pytest.mark.parametrize("module", [smollm2_word, smollm2_sentiment, smollm2_gender],
                         ids=["word", "sentiment", "gender"])
@pytest.mark.parametrize("variant", ["", "demo", "smoke"])
@pytest.mark.parametrize("algo", lm_task.ALGOS)
def test_shipped_configs_validate(module, variant, algo):
    config = module.get_config(variant)
    config.algo = algo
    lm_task.validate(config)


# (field, bad value, algo, the message): each fails in lm_task.validate, before a model loads.
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
        lm_task.validate(config)


def test_ppo_microbatches_must_divide_a_minibatch():
    config = smollm2_word.get_config()
    config.algo, config.batch_size, config.microbatch_size = "ppo", 24, 8
    with pytest.raises(ValueError, match=r"microbatch_size=8 must divide a PPO minibatch \(or be at least one\): "
                                         r"batch_size/ppo.minibatches = 24/2 = 12"):
        lm_task.validate(config)
    for minibatches in (3, 4, 1):  # minibatches of 8 and 6 rows, each differentiated at once; 24 rows, in 3
        config.ppo.minibatches = minibatches
        lm_task.validate(config)


def test_decode_transposed_layers_reaches_the_sampler():
    from types import SimpleNamespace

    from fdrl.models import llama
    config = smollm2_word.get_config()
    tok = SimpleNamespace(eos_id=2, pad_id=0)
    for value, transposed in (("auto", None), ("on", True), ("off", False)):
        config.decode_transposed_layers = value
        lm_task.validate(config)
        sampler = lm_task.make_sampler(config, None, llama.LlamaConfig.tiny(), tok)
        assert sampler.transposed_layers is transposed


def test_target_fields_checked_for_their_kind():
    sentiment, gender = smollm2_sentiment.get_config(), smollm2_gender.get_config()
    sentiment.target.beta = 0.0
    with pytest.raises(ValueError, match="target.beta=0.0 must be a finite number > 0"):
        lm_task.validate(sentiment)
    gender.target.fit_batches = 0
    with pytest.raises(ValueError, match="target.fit_batches=0 must be an integer >= 1"):
        lm_task.validate(gender)


def test_evaluation_chunks_follow_the_microbatch():
    """eval_chunk = 0 evaluates a microbatch at a time where the run samples in them (and the
    microbatch divides eval_batch_size), else all at once; a set eval_chunk wins."""
    config = smollm2_word.get_config()
    assert (config.eval_batch_size, lm_task.eval_chunk_size(config)) == (16, 16)
    config.batch_size, config.microbatch_size = 64, 8
    assert lm_task.eval_chunk_size(config) == 8
    config.microbatch_size = 32  # does not divide 16
    assert lm_task.eval_chunk_size(config) == 16
    config.eval_chunk = 4
    assert lm_task.eval_chunk_size(config) == 4
