from .perplexity import PerplexityResult, perplexity

__all__ = ["perplexity", "PerplexityResult"]
