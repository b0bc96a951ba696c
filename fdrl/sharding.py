"""Device mesh, logical-axis rules, and shardings for parameters, optimiser state and batches.

One config block says how a run is laid out; the code is the same on 1 CPU, 8
devices, a GPU box or a multi-host pod:

    config.mesh.shape = (-1, 1, 1)          # over axes (data, fsdp, tensor); -1 = the rest
    config.mesh.rules.embed = "fsdp"        # logical axis -> mesh axes ("a,b"; "" = replicated)

Parameters carry logical axis names (fdrl.models.llama: layers, embed, heads,
kv_heads, mlp, vocab); the rules map them to mesh axes. A dimension whose size
the mesh axes do not divide is replicated instead (a tiny vocabulary of 97 on a
tensor axis of 2), so any model runs on any mesh. Batches are split along their
leading axis over the "batch" rule (data and fsdp by default: FSDP shards the
batch and the weights over the same devices).

Arrays are built with `jax.make_array_from_callback` from host data that every
process holds, so the same call works on one process and on many.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes, as config strings ("" = replicated). FSDP shards the
# model dimension of every weight; tensor parallelism splits heads, MLP and vocab.
DEFAULT_RULES = {
    "batch": "data,fsdp",
    "layers": "",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
}


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolves one -1 entry to the devices left; checks the product fits."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh.shape={shape} must have {len(MESH_AXES)} entries, one per axis {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh.shape={shape}: entries must be positive, with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh.shape={shape}: {num_devices} devices are not divisible by {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) > num_devices:
        raise ValueError(f"mesh.shape={shape} needs {math.prod(shape)} devices, {num_devices} are available "
                         f"(use -1 for 'the rest')")
    return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A mesh over axes (data, fsdp, tensor).

    `devices` defaults to all devices of all processes. A fixed shape smaller than
    that (say (1, 1, 1) on an 8-device host) takes the first devices, on a
    single process only: every process of a multi-host run must be in the mesh.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(shape, len(devices))
    size = math.prod(shape)
    if size < len(devices):
        if jax.process_count() > 1:
            raise ValueError(f"mesh.shape={shape} covers {size} of {len(devices)} devices; a multi-process run "
                             "needs them all (use -1)")
        devices = devices[:size]
    # Auto axes: XLA's partitioner propagates shardings from the arguments through the model.
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()):  # topology-aware device order on accelerators
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=axis_types)


def mesh_from_config(mesh_config) -> Mesh:
    return make_mesh(tuple(mesh_config.shape))


def parse_rules(rules: Optional[Mapping[str, Any]] = None) -> dict[str, tuple[str, ...]]:
    """Config rules ({"embed": "fsdp", "batch": "data,fsdp", "layers": ""}) -> {logical: mesh axes}."""
    merged = dict(DEFAULT_RULES)
    if rules is not None:
        merged.update(dict(rules))
    parsed = {}
    for logical, target in merged.items():
        if target is None:
            axes = ()
        elif isinstance(target, str):
            axes = tuple(a.strip() for a in target.split(",") if a.strip())
        else:
            axes = tuple(target)
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"rule {logical!r} -> {target!r} names mesh axes {unknown}; the axes are {MESH_AXES}")
        parsed[logical] = axes
    return parsed


def logical_to_spec(logical_axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, tuple[str, ...]]) -> P:
    """PartitionSpec for an array of `shape` whose dimensions have these logical names.

    A mesh axis is used at most once per array; a dimension the mesh axes do not
    divide is replicated.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used, spec = set(), []
    for name, size in zip(logical_axes, shape):
        if name is not None and name not in rules:
            raise ValueError(f"no sharding rule for logical axis {name!r}; rules cover {sorted(rules)}")
        axes = tuple(a for a in (rules[name] if name is not None else ()) if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(_spec_entry(axes))
        else:
            spec.append(None)
    return P(*spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules: Mapping[str, tuple[str, ...]]):
    """NamedShardings for an (abstract) nnx parameter State, from each Param's logical axes."""
    logical = nnx.get_partition_spec(abstract_params)
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, logical_to_spec(tuple(spec), leaf.shape, mesh, rules)),
        logical, abstract_params, is_leaf=lambda x: isinstance(x, P))


def optimizer_shardings(optimizer: optax.GradientTransformation, abstract_opt_state, params_shardings, mesh: Mesh):
    """Optimiser state leaves shaped like parameters follow them; the rest (counts, scalars) are replicated."""
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract_opt_state, params_shardings,
                                 transform_non_params=lambda _: replicated(mesh))


def _spec_entry(axes: tuple[str, ...]):
    """One PartitionSpec entry: None, a mesh axis, or a tuple of them."""
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


def batch_sharding(mesh: Mesh, rules: Mapping[str, tuple[str, ...]], ndim: int = 1) -> NamedSharding:
    """Leading axis over the "batch" rule's mesh axes, the rest replicated."""
    return NamedSharding(mesh, P(_spec_entry(rules["batch"]), *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh, rules: Mapping[str, tuple[str, ...]]) -> int:
    """How many pieces the "batch" rule's mesh axes split a batch into."""
    return math.prod(mesh.shape[a] for a in rules["batch"])


def check_batch(mesh: Mesh, rules: Mapping[str, tuple[str, ...]], size: int, what: str) -> None:
    """Raises unless a batch of `size` splits evenly over the "batch" rule's mesh axes."""
    divisor = batch_shards(mesh, rules)
    if size % divisor:
        raise ValueError(f"{what} must be divisible by the {divisor} batch shards of mesh.shape="
                         f"{tuple(mesh.shape.values())} (rule batch -> {','.join(rules['batch'])})")


def put_global(host_array, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds in full."""
    host_array = np.asarray(host_array)
    return jax.make_array_from_callback(host_array.shape, sharding, lambda index: host_array[index])


def shard_batch(mesh: Mesh, rules: Mapping[str, tuple[str, ...]], *arrays):
    """Puts host arrays [B, ...] onto the mesh split along B. Checks B divides."""
    out = []
    for a in arrays:
        a = np.asarray(a)
        check_batch(mesh, rules, a.shape[0], f"a batch of {a.shape[0]}")
        out.append(put_global(a, batch_sharding(mesh, rules, a.ndim)))
    return out if len(out) != 1 else out[0]


def to_host(array) -> np.ndarray:
    """The full value of a (possibly multi-process) global array on this host."""
    if getattr(array, "is_fully_addressable", True) or array.is_fully_replicated:
        return np.asarray(array)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def init_model_params(make_model: Callable[[], nnx.Module], shardings: Optional[Callable] = None):
    """(graphdef, params) of a freshly initialised model, created in place on its shards:
    the initialiser is jitted with out_shardings from the abstract (eval_shape) state, so
    no device ever holds the whole model. `shardings`: abstract State -> State of shardings."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make_model))

    def init():
        return nnx.split(make_model())[1]

    if shardings is None:
        return graphdef, init()
    return graphdef, jax.jit(init, out_shardings=shardings(abstract))()


def with_shardings(abstract_tree, shardings_tree):
    """ShapeDtypeStructs carrying shardings: the target of a restore onto a new mesh."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree,
                        shardings_tree)
