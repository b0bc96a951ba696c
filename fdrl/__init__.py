"""fdrl: aligning language models by f-divergence minimisation, in JAX."""

from fdrl import divergences, estimators, losses, targets
from fdrl.divergences import NAMES as DIVERGENCES
from fdrl.divergences import Divergence, exact_divergence, get_divergence
from fdrl.estimators import (BaselineState, LogZState, baseline_init, baseline_update, compute_baseline,
                             log_z_init, log_z_update, log_z_value)
from fdrl.losses import fdpg_loss
from fdrl.targets import (distributional_log_potential, fit_lambda, pointwise_log_potential,
                          rlhf_log_potential)

__version__ = "0.1.0"

__all__ = [
    "divergences", "estimators", "losses", "targets",
    "DIVERGENCES", "Divergence", "exact_divergence", "get_divergence",
    "BaselineState", "LogZState", "baseline_init", "baseline_update", "compute_baseline",
    "log_z_init", "log_z_update", "log_z_value",
    "fdpg_loss",
    "distributional_log_potential", "fit_lambda", "pointwise_log_potential", "rlhf_log_potential",
]
