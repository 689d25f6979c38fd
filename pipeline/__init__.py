"""visual-memory: image classification as similarity + search over an editable, sharded kNN memory."""
__version__ = "0.1.0"
