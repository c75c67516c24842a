"""Reinforced Point Selection (RPS) with GRPO: candidates, policy, reward and objective (METHODS.md D).

Pure functions on tensors plus one small scoring head; the Lightning module orchestrates them.
"""
