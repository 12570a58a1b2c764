"""Where a run executes: devices, processes and collectives, precision, memory, the optimizer, CUDA switches."""
