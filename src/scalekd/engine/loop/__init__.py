"""The training loop: the trainer and what it is built of, the epoch loop, its faults, evaluation, logs."""
