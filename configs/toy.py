r"""f-DPG on the exact toy problem (fdrl/toy.py): every divergence is exact.

One run (f and any field by flag):

  python experiments/train.py --config=configs/toy.py --config.f=js
  python experiments/train.py --config=configs/toy.py:smoke --config.target=rlhf --config.f=rkl

The RLHF-vs-GDC comparison (the sweep below, ≥ 3 seeds each):

  python experiments/compare.py --config=configs/toy.py

Variants (the part after ':'): "" the default, "smoke" a few steps for tests.
"""

import math

import ml_collections

# α values of the Amari family swept between GDC (α → 0) and RLHF (α → 1).
ALPHA_GRID = (0.25, 0.5, 0.75)
SWEEP_F = ("fkl", "rkl", "js", "tv") + tuple(f"alpha={a:g}" for a in ALPHA_GRID)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.algo = "fdpg"  # "fdpg", "ppo" (classic RLHF, per-token KL penalty) or "fppo" (PPO on −f'(π/p))
    # Problem: V^L enumerable sequences under a random tabular base model.
    c.vocab_size = 4
    c.seq_len = 6
    c.problem_seed = 0
    # Target: "pointwise" (GDC, b ∈ {0,1}), "rlhf" (a·exp(r/β)), "distributional" (a·exp(λφ)).
    c.target = "pointwise"
    c.beta = 0.2  # RLHF KL coefficient β (> 0)
    c.mu_bar = 0.5  # distributional: required E_p[φ]
    # Pointwise: b = 0 is floored at ε = 1e-3 (log ε below) so that KL(π‖p) and
    # rkl's pseudo-reward stay finite; -inf keeps the hard constraint exactly.
    c.log_b_floor = math.log(1e-3)
    # Divergence: fkl, rkl, js, tv, chi2_pearson, chi2_neyman, hellinger, alpha.
    c.f = "js"
    c.alpha = 0.5  # used when f = "alpha"
    c.max_abs_u = 30.0  # |log π − log p| clip before f' (finiteness guard)
    # Policy: "tabular" (expressive) or "shared" (misspecified bigram bias).
    c.family = "tabular"
    # Estimator.
    c.batch_size = 64
    c.baseline = "batch"  # none, batch, loo, ema, window
    c.baseline_decay = 0.9  # ema
    c.baseline_window = 10  # window
    c.proposal = "policy"  # "policy" (on-policy) or "lagged" (q = π every proposal_every steps)
    c.proposal_every = 10
    # Optimisation.
    c.learning_rate = 0.05
    c.lr_schedule = "constant"  # "constant", "linear" or "cosine" decay to 0 at `steps`
    c.warmup_steps = 0  # linear warm-up (fdrl.optim.learning_rate_schedule)
    c.grad_clip = 0.0  # global-norm clip; 0 = off
    c.steps = 400
    c.eval_every = 20
    c.seed = 0
    c.num_seeds = 3
    # PPO (algo = "ppo" or "fppo"); β above is the KL coefficient of classic PPO-RLHF.
    c.ppo_epochs = 2
    c.ppo_minibatches = 2
    c.clip_eps = 0.2
    c.ppo_aggregation = "sequence_sum"  # token_mean, sequence_mean, sequence_sum (= f-DPG's scale)
    c.gamma = 1.0
    c.gae_lambda = 0.95
    c.use_critic = True
    c.critic_learning_rate = 0.1
    c.value_clip = 10.0
    c.whiten_advantages = False
    c.kl_controller = "fixed"  # or "adaptive": β ← β(1 + K·clip((KL − KL*)/KL*, ±0.2))
    c.kl_target = 0.5
    c.kl_gain = 0.1
    # Output.
    c.workdir = "experiments/results"

    if arg == "smoke":
        c.steps = 40
        c.eval_every = 20
        c.num_seeds = 2
    elif arg:
        raise ValueError(f"unknown configs/toy.py variant {arg!r}; use '' or 'smoke'")
    return c


# Token-level rows beside f-DPG: same target, same samples per step and steps.
SWEEP_PPO = (dict(algo="ppo", f="rkl", label="ppo-rlhf"), dict(algo="fppo", f="js", label="f-ppo(js)"),
             dict(algo="fppo", f="fkl", label="f-ppo(fkl)"))


def get_sweep(arg: str = ""):
    """The comparison grid: a list of overrides, one run (× seeds) each."""
    del arg
    return [dict(target=t, family=fam, **run)
            for t in ("pointwise", "rlhf", "distributional")
            for fam in ("tabular", "shared")
            for run in [dict(f=f) for f in SWEEP_F] + list(SWEEP_PPO)]
