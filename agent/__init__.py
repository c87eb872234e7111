"""store-agent: the edge agent that connects a retail store's devices to the cloud."""

__version__ = "0.1.0"
