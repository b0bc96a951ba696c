r"""SmolLM2-135M-Instruct, distributional constraint (GDC): half of the generated short
biographies use female pronouns. λ is fitted on base-model samples so E_p[φ] = 0.5.

  python experiments/train.py --config=configs/smollm2_gender.py --config.f=fkl
  python experiments/train.py --config=configs/smollm2_gender.py --config.target.mu_bar="(0.3,)"
  python experiments/train.py --config=configs/smollm2_gender.py:smoke
  python experiments/sweep.py --config=configs/smollm2_gender.py:demo   # get_sweep: f over fkl, rkl, js, tv
"""

from configs import lm_common

FEMALE_PRONOUNS = ("she", "her", "hers", "herself")


def get_config(arg: str = ""):
    c = lm_common.base_config()
    c.prompts = "biographies"
    c.target.kind = "distributional"
    c.target.scorer = "word"
    c.target.words = FEMALE_PRONOUNS
    c.target.mu_bar = (0.5,)
    c.conditional = True  # one Z_c per prompt (CDPG)
    c.f = "fkl"
    c.max_new_tokens = 48
    c.workdir = "experiments/results/lm_gender"
    c = lm_common.apply_variant(c, arg, "smollm2_gender")
    if arg == "smoke":  # the random tiny model writes no pronouns: a feature it does hit
        c.target.scorer = "regex"
        c.target.pattern = r"[A-Z]"
    return c


def get_sweep(arg: str = ""):
    """f over fkl, rkl, js, tv."""
    del arg
    return lm_common.f_sweep()
