"""Running models: the model registry and TrainConfig, training as a Tune trial, run directories, trained runs loaded
safely, their confidence, the Ray session, the photo-embedding pipeline, and the engines of `darp evaluate`,
`darp report`, `darp sweep`, `darp serve` (the live web app, its page in static/, on Ray Serve) and `darp play`."""
