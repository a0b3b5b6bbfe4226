"""Metrics of sampled branches: pass@k and distinct-correct, paired breadth, the base/RL mixture frontier,
compute matching, evaluation of a model on a task."""
