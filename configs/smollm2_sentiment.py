r"""SmolLM2-135M-Instruct, RLHF target a·exp(r/β) with r = VADER compound sentiment.

  python experiments/train.py --config=configs/smollm2_sentiment.py --config.f=rkl   # = KL-regularised RLHF
  python experiments/train.py --config=configs/smollm2_sentiment.py --config.target.beta=0.05
  python experiments/train.py --config=configs/smollm2_sentiment.py:demo --config.f=js   # make demo (~10 min CPU)
  python experiments/train.py --config=configs/smollm2_sentiment.py --config.algo=ppo    # PPO-RLHF, value head, GAE
  python experiments/train.py --config=configs/smollm2_sentiment.py --config.algo=fppo --config.f=js
  python experiments/train.py --config=configs/smollm2_sentiment.py:smoke
  python experiments/sweep.py --config=configs/smollm2_sentiment.py:demo   # get_sweep: f's and PPO-RLHF
"""

from configs import lm_common


def get_config(arg: str = ""):
    c = lm_common.base_config()
    c.target.kind = "rlhf"
    c.target.scorer = "sentiment"
    c.target.beta = 0.1
    c.f = "rkl"
    c.algo = "fdpg"  # "fdpg" | "ppo" | "fppo"
    c.workdir = "experiments/results/lm_sentiment"
    return lm_common.apply_variant(c, arg, "smollm2_sentiment")


def get_sweep(arg: str = ""):
    """f over fkl, rkl, js, tv with f-DPG, and PPO-RLHF (trl's recipe: per-token KL penalty, GAE)."""
    del arg
    return lm_common.f_sweep(dict(algo="ppo", f="rkl", label="ppo-rlhf"))
