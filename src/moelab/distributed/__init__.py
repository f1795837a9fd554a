"""Process group, device mesh, parallel wrappers and cross-rank metric reduction.

The only package that imports `torch.distributed` or reads torchrun's environment variables.
"""
