"""innerpissa: trained, reversible steering of language models.

Public API::

    import innerpissa
    adapter = innerpissa.attach(model, innerpissa.AdapterConfig())
    with adapter.steer(1.0):
        ...
    adapter.save("my-adapter"); adapter = innerpissa.load_adapter(model, "my-adapter")
"""

from .adapter import Adapter, AdapterConfig, UnsupportedArchitectureError, attach, load_adapter

__all__ = ["Adapter", "AdapterConfig", "UnsupportedArchitectureError", "attach", "load_adapter"]
__version__ = "0.1.0"
