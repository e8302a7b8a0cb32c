"""The sketch-retrieval environment: data, progressive rendering, glimpses, gallery ranking, Gymnasium env.

This package imports nothing from `policies` or `tune_runs`.
"""

import gymnasium

# `import sketch_env` is all gymnasium.make("SketchRetrieval-v0", ...) and make_vec need.
gymnasium.register(
    "SketchRetrieval-v0",
    entry_point="sketch_env.env:SketchRetrievalEnv",
    vector_entry_point="sketch_env.vector_env:SketchRetrievalVectorEnv",
)
