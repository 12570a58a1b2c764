"""The training engine: config, data, devices and processes, checkpoints, the run folder and the loop."""
