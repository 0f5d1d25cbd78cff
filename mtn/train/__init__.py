"""What both Ray Train jobs share, once: config base (config.py), the one Ray start-up (cluster.py), the trainer and
driver (fit.py), the DeepSpeed engine (deepspeed.py), the LR schedule (schedule.py), precision, checkpoints,
resume, preemption and MLflow tracking."""
