"""fla as the GPU peer of the benchmarks, on the device image's Triton.

fla 0.6.0 refuses its gated chunk backward (`chunk_bwd_dqkwg`) on Hopper with Triton >= 3.4 and < 3.7.1, because
that Triton miscompiles it into wrong gradients (fla issue #640); the GPU machine has Triton 3.6 pinned by its torch
2.11, and a newer Triton (or fla's tilelang backend) does not fit the device tool's 64 MiB carry limit. The kernels
still run, at their normal speed, so the benchmarks lift the refusal for timing and say so: fla's gradients are
then not an oracle, and correctness is checked against the torch reference instead.
"""

from __future__ import annotations


def lift_fla_backward_refusal() -> str | None:
    """Lift the refusal where fla would refuse; returns the note to print, or None where it does not refuse."""
    from fla.ops.common import chunk_o

    refuses = (getattr(chunk_o, "IS_NVIDIA_HOPPER", False) and getattr(chunk_o, "TRITON_ABOVE_3_4_0", False)
               and not getattr(chunk_o, "TRITON_ABOVE_3_7_1", True))
    if not refuses:
        return None
    chunk_o.TRITON_ABOVE_3_7_1 = True  # the module global its check reads
    return ("fla refuses its gated backward on Hopper with this Triton (fla #640: wrong gradients); refusal lifted "
            "for timing, fla's gradients not trusted")
