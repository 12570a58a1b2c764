"""The training engine, by concern:

- :mod:`.inputs`: the run config and its rules, the data and loaders, weight files, the task a config builds;
- :mod:`.runtime`: devices, processes (DDP, gloo / NCCL), precision, memory, the optimizer and CUDA switches;
- :mod:`.run_folder`: the output folder (lock, marker, what may be deleted), checkpoints, the training
  state and the main process's resume protocol;
- :mod:`.loop`: the trainer, the epoch loop, its faults (non-finite losses, stop signals), evaluation and logs.

:mod:`.errors` (how runs end on purpose) serves them all.
"""
