"""The sharded train step: meshes over 8 fake CPU devices (tests/conftest.py) against one device."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import smollm2_sentiment
from fdrl import sharding, train
from fdrl.models import llama

pytestmark = pytest.mark.eight_devices  # skipped with fewer devices (conftest)

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]


def config_on(shape, tmp_path, **overrides):
    config = smollm2_sentiment.get_config("smoke")
    config.mesh.shape = shape
    config.batch_size = 8
    config.eval_batch_size = 8
    config.workdir = str(tmp_path)
    # float32 moments: a bfloat16 first moment rounds differently where two layouts differ in
    # the last float32 bit, a step of 2⁻⁹ of it, far above the tolerances of these comparisons.
    config.adam.mu_dtype = ""
    config.update(overrides)
    return config


def run_steps(trainer, state, steps):
    losses = []
    for _ in range(steps):
        state, scalars = trainer.step(state)
        losses.append(float(scalars["loss"]))  # blocks each step: no runaway multi-device dispatch
    return state, losses


def host_leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# --- mesh and rules -------------------------------------------------------------------

def test_mesh_shape_resolves_and_rejects():
    assert sharding.mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert sharding.mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    assert sharding.make_mesh((1, 1, 1)).devices.size == 1  # a subset of the 8 devices
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.mesh_shape((4, 4, 1), 8)
    with pytest.raises(ValueError, match="not divisible by 3"):
        sharding.mesh_shape((3, -1, 1), 8)
    with pytest.raises(ValueError, match="one per axis"):
        sharding.mesh_shape((8, 1), 8)
    with pytest.raises(ValueError, match="names mesh axes"):
        sharding.parse_rules({"embed": "model"})


def test_logical_to_spec_uses_each_mesh_axis_once_and_replicates_what_does_not_divide():
    mesh, rules = sharding.make_mesh((2, 2, 2)), sharding.parse_rules()
    assert sharding.logical_to_spec(("layers", "embed", "heads"), (2, 32, 64), mesh, rules) == P(None, "fsdp", "tensor")
    assert sharding.logical_to_spec(("vocab", "embed"), (97, 32), mesh, rules) == P(None, "fsdp")  # 97 is odd
    custom = sharding.parse_rules({"embed": "fsdp,tensor", "heads": "tensor"})
    assert sharding.logical_to_spec(("embed", "heads"), (32, 64), mesh, custom) == P(("fsdp", "tensor"), None)
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'experts'"):
        sharding.logical_to_spec(("experts",), (8,), mesh, rules)


def test_batch_not_divisible_by_the_mesh_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="batch_size=6 must be divisible by the 4 batch shards"):
        train.Trainer(config_on((2, 2, 2), tmp_path, batch_size=6))


# --- the sharded step -------------------------------------------------------------------

# Adam divides each gradient by sqrt(v) + eps: with eps = 1e-8 an entry whose gradient is
# ~1e-9 moves by ~lr whatever its sign, so float32 summation-order noise between meshes
# (~1e-10) becomes lr-sized (measured: 3e-5 after two steps at lr 1e-3). eps = 1e-4
# keeps such entries in Adam's linear regime; the comparison then holds to ~1e-7.
EPS = 1e-4


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
    config = config_on((1, 1, 1), tmp_path_factory.mktemp("one"))
    config.adam.eps = EPS
    trainer = train.Trainer(config)
    state, losses = run_steps(trainer, trainer.init_state(), 2)
    return trainer, host_leaves(state.params), losses


@pytest.mark.parametrize("shape", [MESHES[0], pytest.param(MESHES[1], marks=pytest.mark.slow), MESHES[2]],
                         ids=["8x1x1", "2x4x1", "2x2x2"])
def test_sharded_step_equals_one_device(shape, single_device_run, tmp_path):
    one_trainer, one_params, one_losses = single_device_run
    config = config_on(shape, tmp_path)
    config.adam.eps = EPS
    trainer = train.Trainer(config, task=one_trainer.task)
    state, losses = run_steps(trainer, trainer.init_state(), 2)
    np.testing.assert_allclose(losses, one_losses, rtol=1e-5, atol=1e-5)
    for a, b in zip(host_leaves(state.params), one_params):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert state.params["wq"].sharding.mesh.devices.size == 8


def test_parameters_and_optimizer_state_are_sharded_by_the_rules(tmp_path):
    trainer = train.Trainer(config_on((2, 2, 2), tmp_path))
    state = trainer.init_state()
    wq = state.params["wq"]
    assert wq.sharding.spec == P(None, "fsdp", "tensor")
    assert wq.addressable_shards[0].data.shape == (wq.shape[0], wq.shape[1] // 2, wq.shape[2] // 2)
    assert state.params["embed"].sharding.spec == P("tensor", "fsdp")
    assert state.params["final_norm"].sharding.spec == P("fsdp")
    assert trainer.task.ref_params["w_down"].sharding.spec == P(None, "tensor", "fsdp")
    adam = state.opt_state[-1][0]  # chain(clip, adam): adam's ScaleByAdamState
    assert adam.mu["wq"].sharding.spec == P(None, "fsdp", "tensor")
    assert adam.nu["w_up"].sharding.spec == state.params["w_up"].sharding.spec
    for scalar in (adam.count, state.step, state.key, state.log_z.log_sum, state.baseline.window):
        assert scalar.sharding.is_fully_replicated
    state, _ = run_steps(trainer, state, 1)  # the update keeps every sharding (out_shardings)
    assert state.params["wq"].sharding.spec == P(None, "fsdp", "tensor")
    assert state.opt_state[-1][0].mu["wq"].sharding.spec == P(None, "fsdp", "tensor")


# One device (a pod's run sampled on a laptop) with the slow tests: each mesh compiles a step.
@pytest.mark.parametrize("shape", [(2, 4, 1), pytest.param((1, 1, 1), marks=pytest.mark.slow)])
def test_checkpoint_restores_onto_another_mesh(shape, tmp_path):
    saver = train.Trainer(config_on((8, 1, 1), tmp_path / "run"))
    state, _ = run_steps(saver, saver.init_state(), 1)
    manager = train.checkpoint_manager(str(tmp_path / "run"))
    train.save_checkpoint(manager, state)
    _, expected = run_steps(saver, jax.tree.map(lambda x: x.copy(), state), 1)
    trainer = train.Trainer(config_on(shape, tmp_path / "run"), task=saver.task)
    restored = train.restore_checkpoint(manager, trainer.abstract_state)
    assert restored.params["wq"].sharding == trainer.state_shardings.params["wq"].value
    _, losses = run_steps(trainer, restored, 1)
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-5)


# Slow on a 2-core CPU (20–55 s); `make test-slow` runs it, keeping the default run under 15 minutes.
@pytest.mark.slow
def test_resume_on_another_mesh_through_the_loop(tmp_path):
    train.train_and_evaluate(config_on((8, 1, 1), tmp_path, steps=2), log=lambda s: None)
    out = train.train_and_evaluate(config_on((2, 2, 2), tmp_path, resume=True), log=lambda s: None)
    assert int(out["state"].step) == 4
    assert out["state"].params["wq"].sharding.spec == P(None, "fsdp", "tensor")


# One device too: XLA's CPU layouts there once gave the prefill's attention scores a
# BF16 x BF16 -> F32 product its runtime has no kernel for (kernels.einsum_f32).
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 1, 1)])
def test_bfloat16_parameters_keep_a_float32_master_and_float32_logprobs(shape, tmp_path):
    trainer = train.Trainer(config_on(shape, tmp_path, param_dtype="bfloat16", compute_dtype="bfloat16"))
    assert trainer.config.adam.mu_dtype == ""  # config_on: float32 moments
    state = trainer.init_state()
    master = state.opt_state.master
    assert state.params["wq"].dtype == "bfloat16" and master["wq"].dtype == np.float32
    adam = [s for s in jax.tree.leaves(state.opt_state.inner, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(adam.nu))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(adam.mu))
    if shape == (2, 2, 2):  # (one device drops the axes of size 1 from the spec)
        assert master["wq"].sharding.spec == P(None, "fsdp", "tensor")
    _, _, out, _ = trainer.sample(state.params, jax.random.PRNGKey(0), 8)
    assert out.logp.dtype == np.float32
    state, losses = run_steps(trainer, state, 2)
    assert np.all(np.isfinite(losses))
    # The parameters are the master rounded to bfloat16, and the master moved.
    np.testing.assert_array_equal(np.asarray(state.params["wq"]),
                                  np.asarray(state.opt_state.master["wq"].astype("bfloat16")))
    assert not np.array_equal(np.asarray(state.opt_state.master["wq"]),
                              np.asarray(trainer.task.ref_params["wq"]).astype(np.float32))


def test_ahead_of_time_compile_of_a_1b_model_from_abstract_shapes(capsys):
    config = smollm2_sentiment.get_config()
    config.batch_size, config.max_new_tokens = 16, 64
    model_config = llama.LlamaConfig.llama_1b()
    assert 1.2e9 < model_config.num_params() < 1.3e9
    mesh, rules = sharding.make_mesh((1, 8, 1)), sharding.parse_rules(config.mesh.rules)
    compiled = train.lower_update(config, model_config, mesh, rules, prompt_len=64).compile()
    memory = compiled.memory_analysis()
    per_device = memory.argument_size_in_bytes
    # Reference, policy and Adam's second moment in float32, its first in bfloat16, split 8 ways by FSDP.
    assert config.adam.mu_dtype == "bfloat16"
    expected = (3 * 4 + 2) * model_config.num_params() / 8
    assert 0.95 * expected < per_device < 1.05 * expected
    assert memory.alias_size_in_bytes > 0  # the donated state is updated in place
    with capsys.disabled():
        print(f"\n1.24B Llama f-DPG step on mesh 1x8x1: per device arguments {per_device / 2**30:.2f} GiB, "
              f"temporaries {memory.temp_size_in_bytes / 2**30:.2f} GiB")


# Slow on a 2-core CPU (20–55 s); `make test-slow` runs it, keeping the default run under 15 minutes.
@pytest.mark.slow
@pytest.mark.parametrize("microbatch", [0, 4], ids=["whole", "microbatches"])
def test_ppo_step_on_a_mesh_equals_one_device(microbatch, tmp_path):
    """PPO's update (value head, GAE, a scan over shuffled minibatches) shards the same way;
    with microbatches, rollouts drawn and scored 4 at a time and one minibatch of the 8
    differentiated in chunks of 4 (decode layers untransposed: see the test below)."""
    results = []
    for shape in [(1, 1, 1), (2, 2, 2)]:
        config = config_on(shape, tmp_path / "x".join(map(str, shape)), algo="ppo")
        if microbatch:
            config.update(dict(microbatch_size=microbatch, decode_transposed_layers="off"))
            config.ppo.minibatches = 1
        config.adam.eps = EPS
        trainer = train.Trainer(config)
        state, losses = run_steps(trainer, trainer.init_state(), 1)
        results.append((losses, host_leaves(state.params)))
    (one_losses, one_params), (losses, params) = results
    np.testing.assert_allclose(losses, one_losses, rtol=1e-5, atol=1e-5)
    for a, b in zip(params, one_params):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_microbatched_step_on_a_mesh_equals_one_device(tmp_path):
    """Gradient accumulation (microbatch_size) on a mesh: each microbatch split over the batch
    shards, the same two steps as on one device. Decode layers untransposed on both: with the
    transposed layout that `auto` picks at 4 rows, the mesh's products round otherwise than one
    device's, and the tiny model's near-uniform next-token distribution turned that rounding
    into another token (42386 for 42387) in the first step's first microbatch."""
    results = []
    task = None
    for shape in ((1, 1, 1), (2, 2, 2)):
        config = config_on(shape, tmp_path / str(len(results)), microbatch_size=4, decode_transposed_layers="off")
        config.adam.eps = EPS
        trainer = train.Trainer(config, task=task)
        task = trainer.task
        state, losses = run_steps(trainer, trainer.init_state(), 2)
        results.append((host_leaves(state.params), losses))
    (one_params, one_losses), (mesh_params, mesh_losses) = results
    np.testing.assert_allclose(mesh_losses, one_losses, rtol=1e-5, atol=1e-5)
    for a, b in zip(mesh_params, one_params):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
