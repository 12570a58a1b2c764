"""The output folder of a run: the files rules (lock, marker, deletion), checkpoints, the training state,
and the resume protocol of the main process."""
