"""Per-module-type capture of layer inputs h and output gradients d, and the gradient-matrix view."""

from ds_soo.layers.handlers import LayerHandler, find_kfac_layers

__all__ = ["LayerHandler", "find_kfac_layers"]
