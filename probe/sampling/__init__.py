"""Sampling branches: the batched sampler with interventions, its data types, seeded randomness."""
