"""Job launching: local (torchrun) now, SLURM with issue 8."""
