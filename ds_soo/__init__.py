"""ds_soo: second-order optimization (K-FAC, Shampoo, PSGD-Kron) inside DeepSpeed ZeRO, FSDP2 and DDP."""

from ds_soo.config import ConfigError, PreconditionerConfig

__all__ = ["ConfigError", "PreconditionerConfig", "Preconditioner", "SecondOrderOptimizer"]


def __getattr__(name):
    # Lazy so that `import ds_soo.config` stays cheap for the CLI's validation path.
    if name == "Preconditioner":
        from ds_soo.preconditioner import Preconditioner

        return Preconditioner
    if name == "SecondOrderOptimizer":
        from ds_soo.optim import SecondOrderOptimizer

        return SecondOrderOptimizer
    raise AttributeError(name)
