"""The sketch-retrieval environment: data, progressive rendering, glimpses, gallery ranking, Gymnasium env.

This package imports nothing from `policies` or `tune_runs`.
"""
