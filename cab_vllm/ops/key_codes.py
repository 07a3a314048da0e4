"""A low-precision copy of the paged key cache that the token decode scores every key with (ops.token_decode,
``codes=``), kept beside the cache page for page, in one of two formats (KeyCodes.fmt):

"int4": each channel of each group of GROUP consecutive tokens of a page rounded to LEVELS + 1 levels between the
group's minimum and maximum of that channel (asymmetric, per channel: post-RoPE keys have outlier channels that a
per-token scale would let swamp the others; KIVI's key quantization):

  codes   [num_pages, page_size, Hkv, D / 2] uint8   byte j of a token holds channel j (low nibble) and j + D/2
  bounds  [num_pages, page_size, Hkv, 2D / GROUP] float16   a group's per-channel minima then steps ([2, D]),
          spread over its GROUP token slots, 2D / GROUP values each

  A key reads back as minimum + step x code: D/2 bytes of codes and 4D/GROUP bytes of bounds per token and head, 3/8
  of a bf16 key at GROUP 16.

"fp8": each channel's mid-range over the group subtracted (float16), the rest float8 e4m3 with a scale per token
(its largest magnitude at e4m3's 448; experiments/RESULTS.md, "A float8 copy of K": centered, a float8 copy ranks keys
better than int4 per channel, and a tensor-core dot takes float8 operands without unpacking):

  codes   [num_pages, page_size, Hkv, D] uint8   the e4m3 bits of (k - mid) / scale
  bounds  [num_pages, page_size, Hkv, D / GROUP + 1] float16   a group's mid-range [D] spread over its GROUP token
          slots (D / GROUP values each), then each token's largest magnitude (scale = that / 448)

  A key reads back as mid + scale x e4m3(code): D + 2D/GROUP + 2 bytes per token and head, 57% of a bf16 key at D=128.

Both arrays are indexed by page, slot and head, as K is, so a page's copy can sit in the page's own tail
(page_tail_bytes, codes_in_pages), and a page's copy is a function of the page's keys alone (pages a prefix cache shares
hold the same copy whoever wrote it). encode_keys rewrites the groups that hold a step's new keys (every token of such
a group: its range may have grown); the codes of a group still filling are rewritten as it fills.

Twin: encode_keys_torch (and dequantize, the keys a copy reads back as; estimate, the scores a decode ranks keys by).
Both round the same float32 way: int4 code = floor((k - min) / step + 0.5) clamped to 0..LEVELS, min and step stored
as float16 (step at least 2^-14); fp8 by round-to-nearest-even (the kernels round in integer arithmetic, so Triton's
interpreter rounds as a GPU does)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from cab_vllm.ops._triton import HAS_TRITON, check, next_pow2, resolve_impl

GROUP = 16  # tokens that share a channel's range (a vLLM page holds page_size / GROUP groups)
LEVELS = 15  # 4 bits
MIN_STEP = 2.0 ** -14  # float16's smallest normal: a channel constant over its group still has a step to divide by
FORMATS = ("int4", "fp8")
FP8_MAX = 448.0  # e4m3's largest finite value


class KeyCodes(NamedTuple):
    """The key copy: codes [num_pages, page_size, Hkv, C] uint8 and bounds [num_pages, page_size, Hkv, W] float16,
    C and W by fmt ("int4": D / 2 and 2D / GROUP, a group's [2, D] minima and steps over its GROUP slots; "fp8": D and
    D / GROUP + 1, a group's mid-range over its slots, then each token's largest magnitude). Any strides but a
    contiguous last dim."""

    codes: torch.Tensor
    bounds: torch.Tensor
    fmt: str = "int4"


def code_width(head_dim: int, fmt: str = "int4") -> int:
    """Bytes of codes per token and head."""
    return head_dim // 2 if fmt == "int4" else head_dim


def bound_width(head_dim: int, fmt: str = "int4") -> int:
    """float16 values of bounds per token and head."""
    return 2 * head_dim // GROUP if fmt == "int4" else head_dim // GROUP + 1


def key_codes(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, device, fmt: str = "int4"
              ) -> KeyCodes:
    """An empty KeyCodes of format fmt for a cache of num_pages pages of page_size tokens (zeros)."""
    _check_geometry(page_size, head_dim, fmt)
    return KeyCodes(torch.zeros(num_pages, page_size, num_kv_heads, code_width(head_dim, fmt), dtype=torch.uint8,
                                device=device),
                    torch.zeros(num_pages, page_size, num_kv_heads, bound_width(head_dim, fmt), dtype=torch.float16,
                                device=device), fmt)


def _check_geometry(page_size: int, head_dim: int, fmt: str = "int4") -> None:
    check(fmt in FORMATS, f"a key copy's format must be one of {FORMATS}, got {fmt!r}")
    mult = 8 if fmt == "int4" else GROUP
    check(page_size % GROUP == 0 and head_dim % mult == 0 and (fmt == "int4" or head_dim >= 32),
          f"a {fmt} key copy needs page_size % {GROUP} == 0 and a head dim divisible by {mult}"
          f"{'' if fmt == 'int4' else ' and at least 32'}, got {page_size}, {head_dim}")


def bytes_per_token(num_kv_heads: int, head_dim: int, fmt: str = "int4") -> int:
    """Bytes of the copy per token of the cache (all KV heads)."""
    return num_kv_heads * (code_width(head_dim, fmt) + 2 * bound_width(head_dim, fmt))


def page_tail_bytes(page_size: int, num_kv_heads: int, head_dim: int, fmt: str = "int4") -> int:
    """Bytes of the copy for one cache page: its codes [page_size, Hkv, C] uint8, then its bounds [page_size, Hkv, W]
    float16 (KeyCodes; a multiple of 16 bytes: page_size is a multiple of GROUP)."""
    _check_geometry(page_size, head_dim, fmt)
    return page_size * bytes_per_token(num_kv_heads, head_dim, fmt)


def codes_in_pages(storage: torch.Tensor, num_pages: int, page_stride: int, offset: int, page_size: int,
                   num_kv_heads: int, head_dim: int, fmt: str = "int4") -> KeyCodes:
    """KeyCodes views of copies laid out as page_tail_bytes describes, page p's at byte offset + p * page_stride of
    ``storage`` (a uint8 tensor over the whole buffer, e.g. a KV cache's bytes)."""
    _check_geometry(page_size, head_dim, fmt)
    h, w = code_width(head_dim, fmt), bound_width(head_dim, fmt)
    check(storage.dtype == torch.uint8 and storage.dim() == 1, "storage must be a flat uint8 tensor")
    check(page_stride % 2 == 0 and offset % 2 == 0, f"page stride {page_stride} and offset {offset} must be even")
    check(offset + (num_pages - 1) * page_stride + page_tail_bytes(page_size, num_kv_heads, head_dim, fmt)
          <= storage.numel(), "the pages' copies run past the storage")
    codes = torch.as_strided(storage, (num_pages, page_size, num_kv_heads, h), (page_stride, num_kv_heads * h, h, 1),
                             offset)
    half = storage.view(torch.float16) if storage.numel() % 2 == 0 else storage[:-1].view(torch.float16)
    b0 = offset + page_size * num_kv_heads * h
    bounds = torch.as_strided(half, (num_pages, page_size, num_kv_heads, w),
                              (page_stride // 2, num_kv_heads * w, w, 1), b0 // 2)
    return KeyCodes(codes, bounds, fmt)


def check_codes(key_cache: torch.Tensor, kc: KeyCodes) -> None:
    """The copy's shapes, dtypes and device against a [num_pages, page_size, Hkv, D] key cache."""
    pages, page, hkv, d = key_cache.shape
    check(isinstance(kc, KeyCodes), f"codes must be a KeyCodes (codes, bounds), got {type(kc).__name__}")
    _check_geometry(page, d, kc.fmt)
    want_c, want_b = (pages, page, hkv, code_width(d, kc.fmt)), (pages, page, hkv, bound_width(d, kc.fmt))
    check(tuple(kc.codes.shape) == want_c and kc.codes.dtype == torch.uint8 and kc.codes.stride(-1) == 1,
          f"codes must be uint8 {want_c} with a contiguous last dim, got {kc.codes.dtype} {tuple(kc.codes.shape)}")
    check(tuple(kc.bounds.shape) == want_b and kc.bounds.dtype == torch.float16 and kc.bounds.stride(-1) == 1,
          f"bounds must be float16 {want_b} with a contiguous last dim, got {kc.bounds.dtype} "
          f"{tuple(kc.bounds.shape)}")
    check(kc.codes.device == key_cache.device and kc.bounds.device == key_cache.device,
          "the key copy must be on the key cache's device")


def _quantize(k: torch.Tensor, valid: torch.Tensor, levels: int = LEVELS
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One group per leading index: k [..., G, D] float32, valid [..., G, 1] -> codes [..., G, D] uint8 (0 where
    not valid), minimum and step [..., D] (float16 values, as float32)."""
    lo = torch.where(valid, k, float("inf")).amin(-2)
    hi = torch.where(valid, k, float("-inf")).amax(-2)
    lo16 = lo.half().float()
    step = torch.clamp((hi - lo) / levels, min=MIN_STEP).half().float()
    code = torch.clamp(torch.floor((k - lo16[..., None, :]) / step[..., None, :] + 0.5), 0, levels)
    return torch.where(valid, code, 0.0).to(torch.uint8), lo16, step


def round_keys(k: torch.Tensor, bits: int = 4, group: int = GROUP) -> torch.Tensor:
    """Keys k [..., N, D] as a copy of ``bits`` bits per channel reads them back (this module's rounding: each
    channel's range over groups of ``group`` consecutive tokens, the last possibly short; 4 bits and GROUP: what the
    engine's copy holds) -> float32 of k's shape. The transformers adapter's "intcB" selectors."""
    check(1 <= bits <= 8 and group >= 1, f"bits={bits} must be 1..8 and group={group} >= 1")
    n = k.shape[-2]
    pad = (-n) % group
    kg = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).unflatten(-2, ((n + pad) // group, group))
    valid = (torch.arange(n + pad, device=k.device) < n).view((n + pad) // group, group, 1)
    code, lo, step = _quantize(kg, valid, 2 ** bits - 1)
    return (lo[..., None, :] + step[..., None, :] * code.float()).flatten(-3, -2)[..., :n, :]


def _pack(code: torch.Tensor) -> torch.Tensor:
    """[..., D] codes 0..15 -> [..., D / 2] bytes (channel j low, j + D/2 high)."""
    h = code.shape[-1] // 2
    return code[..., :h] | (code[..., h:] << 4)


def _unpack(byte: torch.Tensor) -> torch.Tensor:
    return torch.cat([byte & 15, byte >> 4], -1)


def _quantize_fp8(k: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One group per leading index, the "fp8" format: k [..., G, D] float32, valid [..., G, 1] -> codes [..., G, D]
    uint8 (e4m3 bits, 0 where not valid), mid-range [..., D] (float16 values, as float32), each token's largest
    magnitude after centering [..., G] (float16 values, at least MIN_STEP; 0 where not valid)."""
    hi = torch.where(valid, k, float("-inf")).amax(-2)
    lo = torch.where(valid, k, float("inf")).amin(-2)
    mid = ((hi + lo) / 2).half().float()
    r = torch.where(valid, k - mid[..., None, :], 0.0)
    amax = r.abs().amax(-1).clamp_min(MIN_STEP).half().float()
    x = (r / (amax / FP8_MAX)[..., None]).clamp(-FP8_MAX, FP8_MAX)
    code = x.to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.where(valid, code, 0), mid, torch.where(valid[..., 0], amax, 0.0)


def fp8_values(code: torch.Tensor) -> torch.Tensor:
    """e4m3 bits (uint8) -> their values, float32."""
    return code.view(torch.float8_e4m3fn).float()


def encode_keys_torch(key_cache: torch.Tensor, kc: KeyCodes, block_table: torch.Tensor, seq_lens: torch.Tensor,
                      num_new: torch.Tensor) -> KeyCodes:
    """PyTorch twin of encode_keys (one host read of the rows' lengths; each row's groups at once)."""
    page = key_cache.shape[1]
    dev = key_cache.device
    w = kc.bounds.shape[-1]
    for s, (n, m) in enumerate(zip(seq_lens.tolist(), num_new.tolist())):
        if m <= 0 or n <= 0:
            continue
        g0, g1 = max(0, n - m) // GROUP, (n - 1) // GROUP + 1
        pos = torch.arange(g0 * GROUP, g1 * GROUP, device=dev)
        pages = block_table[s, pos // page].long()
        slots = pos % page
        k = key_cache[pages, slots].float().unflatten(0, (g1 - g0, GROUP)).transpose(1, 2)  # [groups, Hkv, GROUP, D]
        valid = (pos < n).view(g1 - g0, 1, GROUP, 1)
        if kc.fmt == "fp8":
            code, mid, amax = _quantize_fp8(k, valid)  # [groups, Hkv, GROUP, D], [groups, Hkv, D], [groups, Hkv, GROUP]
            kc.codes[pages, slots] = code.transpose(1, 2).flatten(0, 1)
            spread = torch.cat([mid.half().view(g1 - g0, -1, GROUP, w - 1), amax.half()[..., None]], -1)
        else:
            code, lo, step = _quantize(k, valid)  # [groups, Hkv, GROUP, D], [groups, Hkv, D] x 2
            kc.codes[pages, slots] = _pack(code).transpose(1, 2).flatten(0, 1)
            spread = torch.cat([lo, step], -1).half().view(g1 - g0, -1, GROUP, w)  # [groups, Hkv, GROUP, W]
        kc.bounds[pages, slots] = spread.transpose(1, 2).flatten(0, 1)
    return kc


def _fp8_parts(kc: KeyCodes, block_table_row: torch.Tensor, n: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first n keys of one row in an "fp8" copy: e4m3 values [Hkv, n, D], scales [Hkv, n], mid-ranges
    [Hkv, n, D] (each key's group's), float32."""
    from cab_vllm.ops.blocks import gather_paged

    r8 = fp8_values(gather_paged(kc.codes, block_table_row, n))  # [Hkv, n, D]
    hkv, d = r8.shape[0], r8.shape[-1]
    groups = -(-n // GROUP)
    b = gather_paged(kc.bounds, block_table_row, groups * GROUP).float()  # [Hkv, groups * GROUP, W]
    scale = b[:, :n, -1] / FP8_MAX
    mid = b[..., :-1].reshape(hkv, groups, d).repeat_interleave(GROUP, 1)[:, :n]
    return r8, scale, mid


def dequantize(kc: KeyCodes, block_table_row: torch.Tensor, n: int) -> torch.Tensor:
    """The first n keys of one row as the copy reads them back: [Hkv, n, D] float32."""
    from cab_vllm.ops.blocks import gather_paged

    if kc.fmt == "fp8":
        r8, scale, mid = _fp8_parts(kc, block_table_row, n)
        return mid + r8 * scale[..., None]
    code = _unpack(gather_paged(kc.codes, block_table_row, n)).float()  # [Hkv, n, D]
    hkv, d = code.shape[0], code.shape[-1]
    groups = -(-n // GROUP)  # (a group never crosses a page: the last one's slots are in the row's last page)
    b = gather_paged(kc.bounds, block_table_row, groups * GROUP).float().reshape(hkv, groups, 2, d)
    b = b.repeat_interleave(GROUP, 1)[:, :n]  # [Hkv, n, 2, D]
    return b[:, :, 0] + b[:, :, 1] * code


def estimate(q: torch.Tensor, kc: KeyCodes, block_table_row: torch.Tensor, n: int) -> torch.Tensor:
    """The scores q [Hkv, G, D] (a row's queries by KV head) give the row's first n keys by the copy, unscaled:
    [Hkv, G, n] float32: q . (the key the copy reads back as; fp8: s_k (q . k8) + q . mid, as the kernel sums
    it)."""
    q = q.float()
    if kc.fmt != "fp8":
        return torch.einsum("hgd,hnd->hgn", q, dequantize(kc, block_table_row, n))
    r8, scale, mid = _fp8_parts(kc, block_table_row, n)
    return torch.einsum("hgd,hnd->hgn", q, r8) * scale[:, None, :] + torch.einsum("hgd,hnd->hgn", q, mid)


def _check(key_cache, kc, block_table, seq_lens, num_new):
    check(key_cache.dim() == 4, f"key_cache must be [num_pages, page_size, Hkv, D], got {tuple(key_cache.shape)}")
    check_codes(key_cache, kc)
    check(block_table.dim() == 2 and block_table.dtype == torch.int32, "block_table must be int32 [S, max_pages]")
    check(seq_lens.dim() == 1 and num_new.dim() == 1 and seq_lens.shape == num_new.shape
          and seq_lens.dtype == torch.int32 and num_new.dtype == torch.int32 and block_table.shape[0] >= len(seq_lens),
          "seq_lens and num_new must be int32 [S] tensors, block_table [>= S, max_pages]")


def encode_keys(key_cache: torch.Tensor, kc: KeyCodes, block_table: torch.Tensor, seq_lens: torch.Tensor,
                num_new: torch.Tensor, max_new: int | None = None, impl: str = "auto") -> KeyCodes:
    """Rewrite the copy's groups that hold each row's last num_new[s] keys (positions seq_lens[s] - num_new[s] ..
    seq_lens[s] - 1, already in the cache), every token of each such group below seq_lens[s] re-rounded to the group's
    new range.

    key_cache [num_pages, page_size, Hkv, D] (any strides, contiguous head dim); kc a KeyCodes of the same pages;
    block_table [S', max_pages] int32 (S' >= S); seq_lens, num_new [S] int32 on the cache's device. max_new: an upper
    bound on num_new (the grid; one host read when None). Returns kc, written in place."""
    _check(key_cache, kc, block_table, seq_lens, num_new)
    if resolve_impl(impl, key_cache) == "torch":
        return encode_keys_torch(key_cache, kc, block_table, seq_lens, num_new)
    ns = seq_lens.shape[0]
    if max_new is None:
        max_new = int(num_new.max()) if ns else 0
    check(max_new >= 0, f"max_new={max_new} must be >= 0")
    if ns == 0 or max_new == 0:
        return kc
    _, page, hkv, d = key_cache.shape
    groups = (max_new + GROUP - 2) // GROUP + 1  # a run of max_new keys spans at most this many groups (1 key: 1)
    args = (key_cache, kc.codes, kc.bounds, block_table, seq_lens, num_new, hkv, groups,
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), kc.codes.stride(0), kc.codes.stride(1),
            kc.codes.stride(2), kc.bounds.stride(0), kc.bounds.stride(1), kc.bounds.stride(2), block_table.stride(0))
    if kc.fmt == "fp8":
        _encode_fp8_kernel[(ns * hkv * groups,)](*args, HEAD_DIM=d, BLOCK_D=max(16, next_pow2(d)), GROUP_T=GROUP,
                                                 PAGE_SIZE=page, MIN_STEP_T=MIN_STEP, FMAX=FP8_MAX, num_warps=2)
        return kc
    h = d // 2
    _encode_kernel[(ns * hkv * groups,)](*args, HALF=h, BLOCK_H=max(16, next_pow2(h)), GROUP_T=GROUP, PAGE_SIZE=page,
                                         LEVELS_T=LEVELS, MIN_STEP_T=MIN_STEP, num_warps=2)
    return kc


if HAS_TRITON:
    import triton
    import triton.language as tl

    from cab_vllm.ops._triton import paged_coords

    @triton.jit
    def _round_group(k, valid, LEVELS_T: tl.constexpr, MIN_STEP_T: tl.constexpr):
        """k [GROUP, H] float32 of one group (rows valid) -> codes (int32, 0 where not valid), minimum, step [H]
        (float16)."""
        lo = tl.min(tl.where(valid, k, float("inf")), 0)
        hi = tl.max(tl.where(valid, k, float("-inf")), 0)
        lo16 = lo.to(tl.float16)
        step16 = tl.maximum((hi - lo) / LEVELS_T, MIN_STEP_T).to(tl.float16)
        x = tl.floor((k - lo16.to(tl.float32)[None, :]) / step16.to(tl.float32)[None, :] + 0.5)
        code = tl.minimum(tl.maximum(x, 0.0), LEVELS_T).to(tl.int32)
        return tl.where(valid, code, 0), lo16, step16

    @triton.jit
    def _encode_group(bt_ptr, seqlen_ptr, new_ptr, num_kv_heads, groups, stride_bt, GROUP_T: tl.constexpr,
                      PAGE_SIZE: tl.constexpr):
        """An encode program's (row, KV head, j-th group of the row's new keys): the KV head, the row's length, the
        group's first position, its page and first slot, and whether it has keys to encode."""
        pid = tl.program_id(0)
        s = (pid // (num_kv_heads * groups)).to(tl.int64)
        kvh = (pid // groups) % num_kv_heads
        n = tl.load(seqlen_ptr + s)
        m = tl.load(new_ptr + s)
        pos0 = (tl.maximum(n - m, 0) // GROUP_T + pid % groups) * GROUP_T
        live = (m > 0) & (pos0 < n)
        page = tl.load(bt_ptr + s * stride_bt + pos0 // PAGE_SIZE, mask=live, other=0).to(tl.int64)
        return kvh, n, pos0, page, pos0 % PAGE_SIZE, live

    @triton.jit(do_not_specialize=["groups"])
    def _encode_kernel(k_ptr, c_ptr, b_ptr, bt_ptr, seqlen_ptr, new_ptr, num_kv_heads, groups,
                       stride_kpage, stride_kpos, stride_kh, stride_cpage, stride_cpos, stride_ch,
                       stride_bpage, stride_bpos, stride_bh, stride_bt,
                       HALF: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_T: tl.constexpr, PAGE_SIZE: tl.constexpr,
                       LEVELS_T: tl.constexpr, MIN_STEP_T: tl.constexpr):
        """One (row, KV head, group of the row's new keys): the group's tokens below the row's length, rounded per
        channel (the two halves of the head dim: a byte holds one channel of each)."""
        kvh, n, pos0, page, slot0, live = _encode_group(bt_ptr, seqlen_ptr, new_ptr, num_kv_heads, groups, stride_bt,
                                                        GROUP_T, PAGE_SIZE)
        if live:
            t = tl.arange(0, GROUP_T)
            e = tl.arange(0, BLOCK_H)
            e_ok = e < HALF
            valid = (pos0 + t < n)[:, None] & e_ok[None, :]
            koff = page * stride_kpage + ((slot0 + t) * stride_kpos + kvh * stride_kh)[:, None] + e[None, :]
            k_lo = tl.load(k_ptr + koff, mask=valid, other=0.0).to(tl.float32)
            k_hi = tl.load(k_ptr + koff + HALF, mask=valid, other=0.0).to(tl.float32)
            c_lo, lo_lo, st_lo = _round_group(k_lo, valid, LEVELS_T, MIN_STEP_T)
            c_hi, lo_hi, st_hi = _round_group(k_hi, valid, LEVELS_T, MIN_STEP_T)
            coff = page * stride_cpage + ((slot0 + t) * stride_cpos + kvh * stride_ch)[:, None] + e[None, :]
            tl.store(c_ptr + coff, (c_lo | (c_hi << 4)).to(tl.uint8),
                     mask=tl.broadcast_to(e_ok[None, :], [GROUP_T, BLOCK_H]))
            base, quarter = _bound_offsets(page, slot0, kvh, e, stride_bpage, stride_bpos, stride_bh, HALF, GROUP_T)
            tl.store(b_ptr + base, lo_lo, mask=e_ok)
            tl.store(b_ptr + base + quarter, lo_hi, mask=e_ok)
            tl.store(b_ptr + base + 2 * quarter, st_lo, mask=e_ok)
            tl.store(b_ptr + base + 3 * quarter, st_hi, mask=e_ok)

    @triton.jit
    def fp8_bits(x):
        """x float32 within +-448 -> its float8 e4m3 (fn) bits, uint8, rounded to nearest even in integer arithmetic
        (Triton's interpreter rounds float32 to float8 wrongly near powers of two; this rounds as PyTorch does):
        below 2^-6 a multiple of 2^-9 (subnormal codes 0..8, 8 being 2^-6), else the mantissa cut to 3 bits."""
        bits = x.to(tl.int32, bitcast=True)
        a = tl.abs(x)
        sub = (((a + 24576.0) - 24576.0) * 512.0).to(tl.int32)  # 24576 = 1.5 x 2^14: its ulp is 2^-9
        b = a.to(tl.int32, bitcast=True)
        b = (b + (0x7FFFF + ((b >> 20) & 1))) & 0x7FF00000
        normal = (((b >> 23) - 120) << 3) | ((b >> 20) & 7)
        return (tl.where(a < 0.015625, sub, normal) | ((bits >> 24) & 0x80)).to(tl.uint8)

    @triton.jit(do_not_specialize=["groups"])
    def _encode_fp8_kernel(k_ptr, c_ptr, b_ptr, bt_ptr, seqlen_ptr, new_ptr, num_kv_heads, groups,
                           stride_kpage, stride_kpos, stride_kh, stride_cpage, stride_cpos, stride_ch,
                           stride_bpage, stride_bpos, stride_bh, stride_bt,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_T: tl.constexpr,
                           PAGE_SIZE: tl.constexpr, MIN_STEP_T: tl.constexpr, FMAX: tl.constexpr):
        """The "fp8" copy of one (row, KV head, group of the row's new keys): the group's tokens below the row's
        length centered on each channel's mid-range (float16) and scaled per token to e4m3's range."""
        kvh, n, pos0, page, slot0, live = _encode_group(bt_ptr, seqlen_ptr, new_ptr, num_kv_heads, groups, stride_bt,
                                                        GROUP_T, PAGE_SIZE)
        if live:
            t = tl.arange(0, GROUP_T)
            d = tl.arange(0, BLOCK_D)
            d_ok = d < HEAD_DIM
            tok = pos0 + t < n
            valid = tok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + page * stride_kpage + ((slot0 + t) * stride_kpos + kvh * stride_kh)[:, None]
                        + d[None, :], mask=valid, other=0.0).to(tl.float32)
            hi = tl.max(tl.where(valid, k, float("-inf")), 0)
            lo = tl.min(tl.where(valid, k, float("inf")), 0)
            mid16 = ((hi + lo) / 2).to(tl.float16)
            r = tl.where(valid, k - mid16.to(tl.float32)[None, :], 0.0)
            amax16 = tl.maximum(tl.max(tl.abs(r), 1), MIN_STEP_T).to(tl.float16)
            x = r / (amax16.to(tl.float32) / FMAX)[:, None]
            code = tl.where(valid, fp8_bits(tl.minimum(tl.maximum(x, -FMAX), FMAX)), 0)
            tl.store(c_ptr + page * stride_cpage + ((slot0 + t) * stride_cpos + kvh * stride_ch)[:, None] + d[None, :],
                     code.to(tl.uint8), mask=tl.broadcast_to(d_ok[None, :], [GROUP_T, BLOCK_D]))
            wc: tl.constexpr = HEAD_DIM // GROUP_T
            base = b_ptr + page * stride_bpage + kvh * stride_bh
            tl.store(base + (slot0 + d // wc) * stride_bpos + d % wc, mid16, mask=d_ok)
            tl.store(base + (slot0 + t) * stride_bpos + wc, tl.where(tok, amax16, 0.0).to(tl.float16))

    @triton.jit
    def fp8_estimate(qc, expand, cpart, c_ptr, b_ptr, bt_ptr, stride_bt, s, p0, n, kvh, d, d_ok, stride_cpage,
                     stride_cpos, stride_ch, stride_bpage, stride_bpos, stride_bh, scale_log2, TILE_T: tl.constexpr,
                     PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP_T: tl.constexpr, FMAX: tl.constexpr,
                     CDT: tl.constexpr):
        """Base-2 logits, by the "fp8" copy, of keys p0 .. p0 + TILE_T - 1 of row s (p0 a multiple of GROUP_T), KV
        head kvh: the queries qc [GP, BLOCK_D] (in CDT) against the keys the copy reads back as, s_k (q . k8) + q .
        mid. The first a dot of the queries against the float8 codes made CDT (what a tensor core's 16-row dot does
        to float8 operands anyway: queries kept exact), the second a dot against the tile's group centers (at least
        16 rows, those past the tile's groups zero) whose [rows, groups] result ``expand`` ([groups, TILE_T] 0/1, a
        group's row over its keys) spreads over the keys, in two float16 halves (exact to ~2^-22) for 16-bit CDT.
        cpart: the offsets of a group's mid-range entries from its first slot's (channel e at slot e // (D /
        GROUP_T), entry e % (D / GROUP_T)); c_ptr the codes as float8 e4m3. -> [GP, TILE_T] float32."""
        pos = p0 + tl.arange(0, TILE_T)
        ok = pos < n
        page, slot = paged_coords(bt_ptr, stride_bt, s, pos, ok, PAGE_SIZE)
        slot = slot.to(tl.int32)
        k8 = tl.load(c_ptr + (page * stride_cpage + (slot * stride_cpos + kvh * stride_ch))[:, None] + d[None, :],
                     mask=ok[:, None] & d_ok[None, :], other=0.0)  # (into registers: not asynchronous copies)
        wc: tl.constexpr = HEAD_DIM // GROUP_T
        amax = tl.load(b_ptr + page * stride_bpage + (slot * stride_bpos + kvh * stride_bh + wc), mask=ok,
                       other=0.0).to(tl.float32)
        if CDT == tl.float32:
            z = tl.dot(qc, tl.trans(k8.to(CDT)), input_precision="ieee") * (amax * (scale_log2 / FMAX))[None, :]
        else:
            z = tl.dot(qc, tl.trans(k8.to(CDT))) * (amax * (scale_log2 / FMAX))[None, :]
        ng: tl.constexpr = TILE_T // GROUP_T  # the tile's groups, in a dot at least 16 wide (rows past ng masked)
        gi = tl.arange(0, 16 if ng < 16 else ng)
        gpos = p0 + gi * GROUP_T
        g_ok = (gpos < n) & (gi < ng)
        gpage, gslot = paged_coords(bt_ptr, stride_bt, s, gpos, g_ok, PAGE_SIZE)
        cen = tl.load(b_ptr + (gpage * stride_bpage + (gslot.to(tl.int32) * stride_bpos + kvh * stride_bh))[:, None]
                      + cpart[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(CDT)
        if CDT == tl.float32:
            zc = tl.dot(qc, tl.trans(cen), input_precision="ieee") * scale_log2
            z += tl.dot(zc, expand, input_precision="ieee")
        else:
            zc = tl.dot(qc, tl.trans(cen)) * scale_log2
            hi = zc.to(CDT)
            z += tl.dot(hi, expand) + tl.dot((zc - hi.to(tl.float32)).to(CDT), expand)
        return z

    @triton.jit
    def _bound_offsets(page, slot0, kvh, e, stride_bpage, stride_bpos, stride_bh, HALF: tl.constexpr,
                       GROUP_T: tl.constexpr):
        """Offsets of the minima of channels e < HALF of the group whose first slot is slot0 (entry e of the group's
        [2, D] minima then steps, flattened: slot slot0 + e // W, entry e % W, W = 2D / GROUP), and the offset from
        one quarter of that array to the next (the minima of channels HALF + e, then the two halves' steps)."""
        w: tl.constexpr = 4 * HALF // GROUP_T
        quarter = HALF // w * stride_bpos
        # (the group's part and the channels' part apart, so a [groups, 1] and a [1, channels] operand broadcast once)
        return (page * stride_bpage + (slot0 * stride_bpos + kvh * stride_bh)) + (e // w * stride_bpos + e % w), quarter

    @triton.jit
    def dequant_halves(c_ptr, b_ptr, bt_ptr, stride_bt, s, p0, n, kvh, e, e_ok, stride_cpage, stride_cpos, stride_ch,
                       stride_bpage, stride_bpos, stride_bh, TILE_T: tl.constexpr, PAGE_SIZE: tl.constexpr,
                       HALF: tl.constexpr, GROUP_T: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
        """Keys p0 .. p0 + TILE_T - 1 of row s (p0 a multiple of GROUP_T), KV head kvh, as the copy reads them back,
        in two halves of the head dim: channels e and HALF + e ([TILE_T, BLOCK_H] each, in DT; 0 past n). A byte of
        codes holds one channel of each half, so each half is a tile of its own (a dot per half); the bounds are read
        once per group of GROUP_T keys and broadcast over its keys."""
        pos = p0 + tl.arange(0, TILE_T)
        ok = pos < n
        page, slot = paged_coords(bt_ptr, stride_bt, s, pos, ok, PAGE_SIZE)
        mask = ok[:, None] & e_ok[None, :]
        byte = tl.load(c_ptr + (page * stride_cpage + (slot.to(tl.int32) * stride_cpos + kvh * stride_ch))[:, None]
                       + e[None, :], mask=mask, other=0)
        ng: tl.constexpr = TILE_T // GROUP_T
        gpos = p0 + tl.arange(0, ng) * GROUP_T
        g_ok = gpos < n
        gpage, gslot = paged_coords(bt_ptr, stride_bt, s, gpos, g_ok, PAGE_SIZE)
        base, step = _bound_offsets(gpage[:, None], gslot.to(tl.int32)[:, None], kvh, e[None, :], stride_bpage,
                                    stride_bpos, stride_bh, HALF, GROUP_T)  # minima of the two halves, then steps
        gm = g_ok[:, None] & e_ok[None, :]
        lo_lo = _per_key(tl.load(b_ptr + base, mask=gm, other=0.0).to(DT), ng, GROUP_T)
        lo_hi = _per_key(tl.load(b_ptr + base + step, mask=gm, other=0.0).to(DT), ng, GROUP_T)
        st_lo = _per_key(tl.load(b_ptr + base + 2 * step, mask=gm, other=0.0).to(DT), ng, GROUP_T)
        st_hi = _per_key(tl.load(b_ptr + base + 3 * step, mask=gm, other=0.0).to(DT), ng, GROUP_T)
        if DT == tl.float16:  # 1024 + code is exact in float16: its bits are 0x6400 | code (no int-to-float)
            if ASM:
                c_lo, c_hi = _nibbles_asm(byte, 0) - 1024.0, _nibbles_asm(byte, 4) - 1024.0
            else:
                c_lo = ((byte & 15).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
                c_hi = ((byte >> 4).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
        else:
            c_lo, c_hi = (byte & 15).to(DT), (byte >> 4).to(DT)
        return lo_lo + st_lo * c_lo, lo_hi + st_hi * c_hi

    @triton.jit
    def _nibbles_asm(byte, SHIFT: tl.constexpr):
        """(byte >> SHIFT) & 15 of a uint8 tensor as float16 1024 + nibble, four bytes per step: one AND (and a
        shift) of the 32-bit word, then two PRMTs set each 16-bit lane to 0x64 | nibble (no byte-by-byte unpacking).
        PTX: only on a GPU (Triton's interpreter runs no inline assembly)."""
        if SHIFT == 0:
            return tl.inline_asm_elementwise(
                asm="{ .reg .b32 t; and.b32 t, $2, 0x0F0F0F0F; prmt.b32 $0, t, 0x64646464, 0x4140; "
                    "prmt.b32 $1, t, 0x64646464, 0x4342; }",
                constraints="=r,=r,r", args=[byte], dtype=tl.float16, is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(
                asm="{ .reg .b32 t; shr.b32 t, $2, 4; and.b32 t, t, 0x0F0F0F0F; "
                    "prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342; }",
                constraints="=r,=r,r", args=[byte], dtype=tl.float16, is_pure=True, pack=4)

    @triton.jit
    def _per_key(b, NG: tl.constexpr, GROUP_T: tl.constexpr):
        """A group's row [NG, H] repeated for each of its GROUP_T keys: [NG * GROUP_T, H]."""
        return tl.reshape(tl.broadcast_to(b[:, None, :], [NG, GROUP_T, b.shape[1]]), [NG * GROUP_T, b.shape[1]])
