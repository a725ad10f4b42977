"""InnerPiSSA adapter: config (hyperparameters), layer (one adapted linear), model (targets, steer, merge, I/O)."""

from .config import AdapterConfig
from .layer import InnerPiSSALayer, cayley, skew
from .model import Adapter, UnsupportedArchitectureError, attach, decoder_blocks, find_targets, load_adapter

__all__ = [
    "Adapter",
    "AdapterConfig",
    "InnerPiSSALayer",
    "UnsupportedArchitectureError",
    "attach",
    "cayley",
    "decoder_blocks",
    "find_targets",
    "load_adapter",
    "skew",
]
