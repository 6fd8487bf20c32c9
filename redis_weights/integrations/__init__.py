"""Optional adapters for other libraries; each submodule imports its library only when imported itself.

``redis_weights.integrations.torchrl``: TorchRL collectors (needs the ``torchrl`` extra).
"""
