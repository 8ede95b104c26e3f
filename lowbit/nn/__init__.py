from .gemv_linear import GEMVLinear, use_gemv_head
from .qembedding import QEmbedding
from .qlinear import QLinear

__all__ = ["QLinear", "QEmbedding", "GEMVLinear", "use_gemv_head"]
