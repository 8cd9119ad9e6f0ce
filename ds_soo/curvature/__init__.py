"""Single-device curvature math: K-FAC, Shampoo and PSGD-Kron blocks. Never imports torch.distributed."""
