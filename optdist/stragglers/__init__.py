"""Stragglers on a simulated clock: delay models, backup workers (static and DBW), gradient coding per
round and across rounds (sequential)."""

from optdist.stragglers import clock, gradient_coding, sequential
from optdist.stragglers.backup import (
    BackupState,
    DynamicBackupState,
    backup_mean,
    backup_mean_gradients,
    dbw_choice,
    dynamic_backup_mean,
    dynamic_backup_mean_gradients,
)
from optdist.stragglers.clock import DelayModel, simulated_time

__all__ = [
    "BackupState",
    "DelayModel",
    "DynamicBackupState",
    "backup_mean",
    "backup_mean_gradients",
    "clock",
    "dbw_choice",
    "dynamic_backup_mean",
    "dynamic_backup_mean_gradients",
    "gradient_coding",
    "sequential",
    "simulated_time",
]
