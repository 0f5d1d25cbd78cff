"""The jobs: one readable script per job, run as `python jobs/<job>.py`, `mtn <command>` or `ray job submit -- ...`.

A package, so that a sweep, the CLI, a benchmark or a test imports a job (`from jobs import train_mtn`) instead of
loading a file by path.
"""
