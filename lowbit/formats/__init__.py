"""Number formats (value grids) and the bit layout that stores their codes."""

from . import codebook, int  # noqa: F401  (registers the format families)
from .base import (
    SCALE_SEARCHES,
    Format,
    fit_searched,
    format_family_names,
    format_from_name,
    get_format,
)
from .packing import LAYOUT, pack, packed_row_bytes, unpack

__all__ = ["Format", "SCALE_SEARCHES", "fit_searched", "get_format", "format_from_name",
          "format_family_names", "pack", "unpack",
           "packed_row_bytes", "LAYOUT"]
