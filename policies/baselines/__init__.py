"""The baselines of the paper's Table III: policies on the phase-1 features (no-attention ablation, vanilla PG), Bootstrapped DQN and PPO."""
