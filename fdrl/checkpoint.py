"""Orbax checkpoints of the whole train state, restorable onto another mesh.

Every process of a multi-host run calls these: each writes and reads only its own
shards. A restore takes an abstract state (ShapeDtypeStructs carrying the *new*
run's shardings, `Trainer.abstract_state`), so a checkpoint saved on 8 devices
comes back on 1 device or on a 2×4 mesh, each array resharded as it is read.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Optional, Sequence

import jax
import orbax.checkpoint as ocp

from fdrl import file_lock


def checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
    """<workdir>/checkpoints, keeping the last two steps."""
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def saved_steps(workdir: str, manager=None) -> list[int]:
    """The steps saved in <workdir>/checkpoints (read through `manager` when given),
    ascending; [] without that folder (and then nothing is created, unlike
    checkpoint_manager)."""
    if manager is None:
        if not os.path.isdir(os.path.join(workdir, "checkpoints")):
            return []
        manager = checkpoint_manager(workdir)
    return sorted(manager.all_steps())


def require_checkpoint(workdir: str, step: Optional[int] = None, manager=None) -> list[int]:
    """The saved steps of workdir (through `manager` when given); raises naming the
    workdir when it holds none, or the step when it is not among them. Cheap: callers
    check before building a model."""
    steps = saved_steps(workdir, manager)
    if not steps:
        raise FileNotFoundError(f"no checkpoints in workdir={workdir!r}: train with experiments/train.py and "
                                "checkpoint_every > 0 first, or pass the run's --config.workdir")
    if step is not None and step not in steps:
        raise ValueError(f"no checkpoint of step={step} in {workdir!r}; it holds steps {steps}")
    return steps


@contextlib.contextmanager
def claim_workdir(workdir: str):
    """Holds <workdir>/run.lock while a run writes there (one process per run takes it).

    A second run started on the same workdir (an f sweep launched in parallel with one
    --config.workdir) fails at once, naming the first, instead of writing its logs and
    checkpoints into the first's. The lock ends with the run, or with its process.
    """
    os.makedirs(workdir, exist_ok=True)
    held = contextlib.ExitStack()
    try:
        held.enter_context(file_lock.exclusive(os.path.join(workdir, "run.lock"), wait=False,
                                               note=f"pid {os.getpid()} on {socket.gethostname()}"))
    except file_lock.LockedError as e:
        raise RuntimeError(f"another run ({e}) is writing to workdir={workdir!r}: wait for it to end, or give "
                           "this one its own --config.workdir") from None
    with held:
        yield


def save_checkpoint(manager, state: Any) -> None:
    """Saves `state` under its step and waits until every process has written."""
    manager.save(int(state.step), args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def restore_checkpoint(manager, abstract_state: Any, step: Optional[int] = None) -> Any:
    """The state at `step` (default: the latest), laid out as `abstract_state` says."""
    step = _step_or_latest(manager, step)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def _step_or_latest(manager, step: Optional[int]) -> int:
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint to restore from in {manager.directory}")
    return step


def restore_fields(manager, abstract_state: Any, fields: Sequence[str], step: Optional[int] = None) -> Any:
    """Only `fields` of a NamedTuple state (e.g. ("params", "step")), read from the checkpoint
    at `step` (default: the latest) as `abstract_state` lays them out; the other fields come
    back as None and are never read (a policy to sample needs no optimiser moments)."""
    step = _step_or_latest(manager, step)
    unknown = set(fields) - set(abstract_state._fields)
    if unknown:
        raise ValueError(f"unknown state fields {sorted(unknown)}; the state has {abstract_state._fields}")
    is_placeholder = lambda x: x is ocp.PLACEHOLDER  # noqa: E731
    skipped = {name: jax.tree.map(lambda _: ocp.PLACEHOLDER, getattr(abstract_state, name))
               for name in abstract_state._fields if name not in fields}
    item = abstract_state._replace(**skipped)
    restore_args = jax.tree.map(lambda x: x if is_placeholder(x) else ocp.ArrayRestoreArgs(sharding=x.sharding),
                                item, is_leaf=is_placeholder)
    path = os.path.join(str(manager.directory), str(step), "default")  # StandardSave's item in the step
    restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(item=item,
                                                                                  restore_args=restore_args))
    return restored._replace(**{name: None for name in skipped})
