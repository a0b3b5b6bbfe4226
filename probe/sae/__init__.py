"""Sparse autoencoders (sae-lens): train, load, check and encode; the features RL suppressed at forks;
SAE quality; feature figures."""
