from .qlinear import QLinear

__all__ = ["QLinear"]
