"""InnerPiSSA adapter: config (hyperparameters), layer (one adapted linear), targets (what to adapt, found by
structure), model (attach, steer, merge, save, load), storage (the on-disk format and its checks)."""

from .config import AdapterConfig
from .layer import InnerPiSSALayer, cayley, skew
from .model import Adapter, attach, load_adapter
from .targets import UnsupportedArchitectureError, decoder_blocks, find_targets

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
