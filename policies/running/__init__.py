"""Running models: the model registry and TrainConfig, training as a Tune trial, run directories, trained runs loaded
safely, their confidence, config values checked as flags, the Ray session and the photo-embedding pipeline."""
