"""benchmarks/kernel_ab.py's source patch: every op registration of the kernels compiled out under LB_NO_LIB."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _kernel_ab():
    spec = importlib.util.spec_from_file_location("kernel_ab", ROOT / "benchmarks" / "kernel_ab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_library_block_of_the_kernels_is_guarded():
    guard = _kernel_ab().guard_library_blocks
    for path in (ROOT / "lowbit" / "kernels" / "csrc").glob("*.cpp"):
        source = path.read_text()
        guarded = guard(source)
        blocks = source.count("\nTORCH_LIBRARY")
        assert guarded.count("#ifndef LB_NO_LIB\nTORCH_LIBRARY") == blocks
        # with every guarded span removed, no registration is left and the rest is the source unchanged
        kept, pos = [], 0
        while (start := guarded.find("#ifndef LB_NO_LIB\n", pos)) >= 0:
            kept.append(guarded[pos:start])
            pos = guarded.index("\n#endif\n", start) + len("\n#endif\n")
        kept.append(guarded[pos:])
        assert "TORCH_LIBRARY" not in "".join(kept)
        assert len(guarded) == len(source) + blocks * len("#ifndef LB_NO_LIB\n\n#endif\n")


def test_nested_braces_and_comments():
    source = "int a;\n// TORCH_LIBRARY in a comment\nTORCH_LIBRARY_IMPL(x, CPU, m) {\n  if (1) { m.f(); }\n}\nint b;\n"
    assert _kernel_ab().guard_library_blocks(source) == (
        "int a;\n// TORCH_LIBRARY in a comment\n#ifndef LB_NO_LIB\nTORCH_LIBRARY_IMPL(x, CPU, m) {\n"
        "  if (1) { m.f(); }\n}\n#endif\n\nint b;\n")
