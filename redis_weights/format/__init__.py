"""The version format, bytes and their layout, without Redis: the safetensors header, chunks and
their ids (``codec``), the manifest and its stored form, chunk patches, packs, and the trainer's
delta plan."""
