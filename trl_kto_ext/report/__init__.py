"""What a run reports: the step metrics, the model card and the training-curve plots."""
