"""The run config and its rules, the datasets and loaders, weight files, and the task a config builds."""
