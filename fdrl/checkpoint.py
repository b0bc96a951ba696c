"""Orbax checkpoints of the whole train state, restorable onto another mesh.

Every process of a multi-host run calls these: each writes and reads only its own
shards. A restore takes an abstract state (ShapeDtypeStructs carrying the *new*
run's shardings, `Trainer.abstract_state`), so a checkpoint saved on 8 devices
comes back on 1 device or on a 2×4 mesh, each array resharded as it is read.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import orbax.checkpoint as ocp


def checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
    """<workdir>/checkpoints, keeping the last two steps."""
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def save_checkpoint(manager, state: Any) -> None:
    """Saves `state` under its step and waits until every process has written."""
    manager.save(int(state.step), args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def restore_checkpoint(manager, abstract_state: Any, step: Optional[int] = None) -> Any:
    """The state at `step` (default: the latest), laid out as `abstract_state` says."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint to resume from in {manager.directory}")
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
