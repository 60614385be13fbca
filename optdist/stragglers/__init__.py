"""Stragglers on a simulated clock: delay models, backup workers (static and DBW), gradient coding."""

from optdist.stragglers import clock, gradient_coding
from optdist.stragglers.backup import (
    BackupState,
    DynamicBackupState,
    backup_mean,
    dbw_choice,
    dynamic_backup_mean,
)
from optdist.stragglers.clock import DelayModel

__all__ = [
    "BackupState",
    "DelayModel",
    "DynamicBackupState",
    "backup_mean",
    "clock",
    "dbw_choice",
    "dynamic_backup_mean",
    "gradient_coding",
]
