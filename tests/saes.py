"""Test helpers for SAEs: a random sae-lens TopK SAE with non-trivial decoder norms and bias."""

import torch
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig


def random_sae(d_in: int = 32, d_sae: int = 64, k: int = 4, hook: str | None = "blocks.0.hook_resid_post", seed=0):
    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(d_sae, 1) + 0.5)  # non-unit rows, so normalisation matters
        sae.b_dec.normal_(0, 0.1)
    if hook:
        sae.cfg.metadata.hook_name = hook
    return sae
