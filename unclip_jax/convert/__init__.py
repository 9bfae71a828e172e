"""Importers from PyTorch / safetensors checkpoints into our parameter trees.

One module per source model family; ``common`` holds the shared loading, checking and
saving. Torch is never needed to read ``.safetensors``; ``.bin``/``.pt`` files are read
only through ``torch.load(weights_only=True)``.
"""
