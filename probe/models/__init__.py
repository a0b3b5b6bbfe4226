"""Model access: load checkpoints (directory, .gguf, BASE+ADAPTER), hooked views (TransformerLens, nnsight),
checked base/RL pairs, hook sites found from the module tree, norms, KV caches, memory budgets."""
