r"""SmolLM2-135M-Instruct, pointwise constraint (GDC): the reply mentions a chosen word.

  python experiments/train.py --config=configs/smollm2_word.py --config.f=fkl
  python experiments/train.py --config=configs/smollm2_word.py --config.target.words="('happy','glad')"
  python experiments/train.py --config=configs/smollm2_word.py:smoke     # tiny random model, 4 steps
  python experiments/sweep.py --config=configs/smollm2_word.py:demo     # get_sweep: f over fkl, rkl, js, tv

Target p(x|c) ∝ a(x|c)·b(x), b(x) = 1[x contains the word]. For f = rkl the hard
constraint needs a floor: --config.target.log_b_floor=-10 (b = 0 → ε = e^-10).
"""

from configs import lm_common


def get_config(arg: str = ""):
    c = lm_common.base_config()
    c.target.kind = "pointwise"
    c.target.scorer = "word"
    # Any of these words. Alone each is rare under SmolLM2 on the chat prompts (in 128 samples:
    # great 3.9%, beautiful 3.1%, love / amazing / wonderful 2.3%; "happy" 0.8%), and a target
    # that no sample of a batch meets gives f-DPG no signal.
    c.target.words = ("great", "beautiful", "love", "amazing", "wonderful")
    c.f = "js"
    c.learning_rate = 1e-5
    c.workdir = "experiments/results/lm_word"
    return lm_common.apply_variant(c, arg, "smollm2_word")


def get_sweep(arg: str = ""):
    """f over fkl, rkl, js, tv; rkl with b floored at e^-10 (KL(π‖p) is infinite while π
    writes replies without the word)."""
    del arg
    return [entry if entry["f"] != "rkl" else dict(entry, label="rkl-floored", **{"target.log_b_floor": -10.0})
            for entry in lm_common.f_sweep()]
