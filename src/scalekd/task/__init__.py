"""The distillation task: frozen teacher + trainable student and projectors, in timm's ``TrainingTask`` protocol."""
