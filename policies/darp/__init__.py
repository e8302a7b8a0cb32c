"""DARP on RLlib: networks, the RLModule, the learner, the algorithm, its EnvRunner and connectors, validation, acting with a trained module and the supervised warm start."""
