"""steering: change models at inference (steering vectors with provenance, gated application, sweeps).

Nothing here yet: the steering issue builds it on top of `probe` (see ../shared/DESIGN.md).
Never imports `experiments`.
"""
