"""Data layer: WebDataset shard schema and tools, the streaming loader, image transforms, the shapes world.

Import modules explicitly (``from data.loader import StreamingLoader``); never ``import data``.
"""
