"""Embedding layer: encoder registry + preprocessing, and the Ray Data stage that writes Parquet parts.

Public API: `create_encoder`, `available_encoders`, `register_encoder`, `Encoder` (encoders);
`PreprocessSpec`, `decode_image` (preprocess; the function `preprocess` lives in
`pipeline.embed.preprocess`, a name the submodule itself takes here); `embed_split`, `embed_images`,
`EmbedReport` (stage); `read_embeddings`, `iter_embedding_batches` (parts).
Modules load on first use, so importing `pipeline.embed` does not import torch.
"""

_LAZY = {
    "create_encoder": "encoders", "available_encoders": "encoders", "register_encoder": "encoders",
    "Encoder": "encoders", "PreprocessSpec": "preprocess", "decode_image": "preprocess",
    "embed_split": "stage", "embed_images": "stage", "EmbedReport": "stage",
    "read_embeddings": "parts", "iter_embedding_batches": "parts",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"pipeline.embed.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pipeline.embed' has no attribute {name!r}")


__all__ = list(_LAZY)
