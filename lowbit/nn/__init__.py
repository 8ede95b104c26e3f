from .attention import use_cpu_attention
from .gemv_linear import FLOAT_LINEARS, GEMVLinear, is_float_linear, use_gemv_head
from .qembedding import QEmbedding
from .qlinear import QLinear

__all__ = ["QLinear", "QEmbedding", "GEMVLinear", "FLOAT_LINEARS", "is_float_linear", "use_gemv_head",
           "use_cpu_attention"]
