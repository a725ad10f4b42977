"""innerpissa: trained, reversible steering of language models.

Public API (the README's quick start needs nothing deeper)::

    import innerpissa
    lm = innerpissa.load_model()                                  # the embedded SmolLM2, a directory or a .gguf
    adapter = innerpissa.attach(lm.model, innerpissa.AdapterConfig())
    pairs = innerpissa.make_honesty_pairs(lm.tokenizer)           # or innerpissa.load_pairs("my.jsonl", tok)
    innerpissa.train(adapter, lm.tokenizer, list(pairs.train), list(pairs.val), innerpissa.TrainConfig())
    with adapter.steer(1.0):
        ...
    adapter.save("my-adapter"); adapter = innerpissa.load_adapter(lm.model, "my-adapter")

``innerpissa.train`` is the training function; the training subpackage's other names import as usual
(``from innerpissa.train import TrainConfig``; ``from innerpissa.train.loop import …`` for a module).

Modules follow the data flow: ``pairs`` → ``adapter`` → ``train`` → ``eval`` → ``export``; ``transfer`` (teacher →
student directions) beside them; ``docs/design.md`` has the maths.
"""

from .adapter import Adapter, AdapterConfig, UnsupportedArchitectureError, attach, load_adapter
from .concepts import get_concept
from .errors import InnerPiSSAError
from .models import load_model
from .pairs import ContrastivePair, load_pairs, make_honesty_pairs, make_persona_pairs
from .train import TrainConfig, train

__all__ = [
    "Adapter",
    "AdapterConfig",
    "ContrastivePair",
    "InnerPiSSAError",
    "TrainConfig",
    "UnsupportedArchitectureError",
    "attach",
    "get_concept",
    "load_adapter",
    "load_model",
    "load_pairs",
    "make_honesty_pairs",
    "make_persona_pairs",
    "train",
]
__version__ = "0.1.0"
