"""Distributed placement of curvature: who owns which block, where gradient fragments live, and the
coalesced collectives that move statistics and gradients between them. Knows nothing of models."""
