"""Entry points of the `darp` command: pretrain, train, evaluate, play, sweep, report, demo, serve."""
