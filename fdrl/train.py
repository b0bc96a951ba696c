"""f-DPG on a language model: the loop. `Trainer` holds the built task on a device mesh
and the jitted update; `train_and_evaluate` runs (or resumes) a run in its workdir.

Per step: draw contexts, sample completions from the proposal with the KV-cache
sampler, decode and score them on the host, then the jitted update
(`fdrl.lm_step`), which scores the reference (teacher forcing), updates log Z (per
context for conditional targets) and the baseline, and applies `fdpg_loss` through
optax. The sampler's log-probs are reused as the proposal's: the proposal is never
re-scored. What the config describes is checked and built by `fdrl.lm_task`.

Off-policy (`config.proposal = "offpolicy"`): samples come from a frozen copy q,
importance-weighted by π/q; q is replaced by π when π is estimated closer to p
(KL(p‖·) by self-normalised IS on the batch), the DPG rule.

Everything that resuming needs is in `LMTrainState` (params, optimiser, q,
log Z, baseline, PRNG key, step) and is saved with orbax; prompt choice and
sampling draw from the state's key, so `--config.resume` continues exactly.

The names of `lm_task` and `lm_step` are importable from here too (`train.validate`,
`train.accumulated_update`, ...), as they were before the three were split.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fdrl import estimators, host_memory, interrupt, metrics, scorers, sharding
from fdrl.checkpoint import (checkpoint_manager, claim_workdir, require_checkpoint, restore_checkpoint, restore_fields,
                             save_checkpoint, saved_steps)
from fdrl.lm_step import (UPDATE_BATCH, LMTrainState, StepParts, accumulated_update, build_step, init_state,
                          lower_update, ppo_update, sequence_logp, state_shardings, states_shape, update,
                          update_compiler_options)
from fdrl.lm_task import (ALGOS, PROPOSALS, TARGET_KINDS, TRANSPOSED_LAYERS, Task, build_model, build_target,
                          build_task, encode_prompts, eval_chunk_size, is_pure_sampling, load_config_prompts,
                          make_sampler, num_microbatches, reuses_sampler_states, validate)

__all__ = [  # the loop's own names, and those of lm_task and lm_step it re-exports
    "Trainer", "restore_run", "train_and_evaluate", "checkpoint_manager", "restore_checkpoint", "restore_fields",
    "save_checkpoint", "UPDATE_BATCH", "LMTrainState", "StepParts", "accumulated_update", "build_step", "init_state",
    "lower_update", "ppo_update", "sequence_logp", "state_shardings", "states_shape", "update",
    "update_compiler_options", "ALGOS", "PROPOSALS", "TARGET_KINDS", "TRANSPOSED_LAYERS", "Task", "build_model",
    "build_target", "build_task", "encode_prompts", "eval_chunk_size", "is_pure_sampling", "load_config_prompts",
    "make_sampler", "num_microbatches", "reuses_sampler_states", "validate"]

Array = jax.Array


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

def _summary_writer_class():
    """tensorboardX's SummaryWriter, or None where tensorboardX is missing (TensorBoard is
    optional; the JSONL log always works). tensorboardX imports torch wherever it is installed,
    only to accept torch tensors (fdrl logs floats), and torch's libraries then stayed resident
    for the whole run: the demo's settings peaked at 3.13 GB with torch in the environment (as
    `make bench` leaves it) against 2.94 GB without. Unless the process holds torch already,
    tensorboardX is imported with torch hidden."""
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # `import torch` raises ImportError, as where it is not installed
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter


class _Writers:
    """metrics.jsonl and TensorBoard event files in the workdir."""

    def __init__(self, workdir: str, append: bool):
        os.makedirs(workdir, exist_ok=True)
        # A resumed run continues its log; a fresh run starts a new one.
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a" if append else "w")
        summary_writer = _summary_writer_class()
        self._tb = None if summary_writer is None else summary_writer(os.path.join(workdir, "tb"))

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
