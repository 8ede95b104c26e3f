from .qembedding import QEmbedding
from .qlinear import QLinear

__all__ = ["QLinear", "QEmbedding"]
