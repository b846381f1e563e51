"""Triton kernels of the batched LoRA for few rows (decode), punica BGMV style: each row reads only
its own slot's A and B, so a decode step's cost follows the adapters in use instead of every slot.

``y += (x A[slot]ᵀ) B[slot]ᵀ`` per row, in two launches: *shrink* ``x [T, K]`` → ``xa [T, R]`` (float32)
with the row's ``R`` rows of the stacked ``A [S·R, K]``, then *expand* ``xa`` → ``y [T, N]`` with the
row's ``R`` columns of ``B [N, S·R]`` (``R`` = one slot's width, ``p · max_lora_rank``). A row of slot
-1 is left as it is. Shapes are static and the slots are read on the device, so CUDA graphs capture
them. :class:`~telechat.model.lora.LoraBatch` uses them on CUDA for up to :data:`MAX_ROWS` rows and
the masked GEMMs (tensor cores, every slot) above.
"""

from __future__ import annotations

import torch

from telechat.model.kernels import triton

MAX_ROWS = 16
"""Rows up to which the per-row kernels run; larger batches use the masked GEMMs (reading every slot
once beats reading a slot per row there)."""

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _shrink(x_ptr, a_ptr, slots_ptr, out_ptr, T, K, R, k_per_split, stride_x, stride_a,
                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        # program (row t, BLOCK_R columns of the slot's width, one K slice): a partial sum in out[split, t, :]
        t = tl.program_id(0)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        split = tl.program_id(2)
        r_ok = r < R
        slot = tl.load(slots_ptr + t)
        if slot >= 0:
            rows = slot * R + r
            acc = tl.zeros([BLOCK_R], dtype=tl.float32)
            k_lo = split * k_per_split
            k_hi = tl.minimum(k_lo + k_per_split, K)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < k_hi
                xv = tl.load(x_ptr + t * stride_x + k, mask=k_ok, other=0.0).to(tl.float32)
                av = tl.load(a_ptr + rows[:, None] * stride_a + k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                             other=0.0).to(tl.float32)
                acc += tl.sum(av * xv[None, :], axis=1)
            tl.store(out_ptr + (split * T + t) * R + r, acc, mask=r_ok)

    @triton.jit
    def _expand(xa_ptr, b_ptr, slots_ptr, y_ptr, T, N, R, splits, stride_b, stride_y,
                BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        # xa holds `splits` partial sums per row (the shrink's K slices), added here in a fixed order
        t = tl.program_id(0)
        slot = tl.load(slots_ptr + t)
        if slot >= 0:
            n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < N
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                r_ok = r < R
                xv = tl.zeros([BLOCK_R], dtype=tl.float32)
                for s in range(0, splits):
                    xv += tl.load(xa_ptr + (s * T + t) * R + r, mask=r_ok, other=0.0)
                bv = tl.load(b_ptr + n[:, None] * stride_b + (slot * R + r)[None, :],
                             mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(bv * xv[None, :], axis=1)
            out = y_ptr + t * stride_y + n
            y = tl.load(out, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(out, (y + acc).to(out.dtype.element_ty), mask=n_ok)


SHRINK_K = 512
"""Columns of x one shrink program reduces: a 4096-wide projection is read by 8 programs per 16 columns
of the slot's width, so one decoding row still puts dozens of programs in flight."""
SHRINK_R = 16


def lora_rows(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
              width: int) -> torch.Tensor:
    """Add to ``y [T, N]`` (in place) each row's LoRA: ``x [T, K]`` through the ``width`` rows of
    ``a [S·width, K]`` and the ``width`` columns of ``b [N, S·width]`` of its slot (``slots [T]``, -1: none).
    The shrink splits K across programs (partial sums the expand adds in order: deterministic)."""
    t, k = x.shape
    n = y.shape[1]
    splits = triton.cdiv(k, SHRINK_K)
    xa = torch.empty(splits, t, width, dtype=torch.float32, device=x.device)
    _shrink[(t, triton.cdiv(width, SHRINK_R), splits)](x, a, slots, xa, t, k, width, SHRINK_K, x.stride(0),
                                                       a.stride(0), BLOCK_R=SHRINK_R, BLOCK_K=128)
    _expand[(t, triton.cdiv(n, 128))](xa, b, slots, y, t, n, width, splits, b.stride(0), y.stride(0),
                                      BLOCK_N=128, BLOCK_R=min(64, triton.next_power_of_2(width)))
    return y
