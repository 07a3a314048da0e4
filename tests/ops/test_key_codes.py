"""The 4-bit key copy (ops.key_codes): the encode kernel (interpreted on a CPU) against its PyTorch twin, the twin
against the rounding rule written out, keys appended a few at a time against one encode of the whole row, and
the copy's error bound."""

from __future__ import annotations

import pytest
import torch

from cab_vllm.ops import key_codes as kq
from cab_vllm.ops._triton import HAS_TRITON, interpreting
from cab_vllm.ops.blocks import gather_paged

TRITON = pytest.mark.skipif(not (HAS_TRITON and interpreting()), reason="needs TRITON_INTERPRET=1 (CPU tensors)")


def cache(lens, hkv, d, page, seed=0, dtype=torch.float32):
    """A key cache [pages, page, Hkv, D] with outlier channels, a permuted block table (page 0 unused) and
    seq_lens for rows of lengths ``lens``."""
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-n // page) for n in lens]
    total = sum(pages) + 1
    scale = torch.ones(d)
    scale[torch.randperm(d, generator=gen)[:3]] = 20.0  # post-RoPE keys: a few channels far larger
    kc = (torch.randn(total, page, hkv, d, generator=gen) * scale).to(dtype)
    ids = torch.randperm(total - 1, generator=gen) + 1
    bt = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    off = 0
    for s, p in enumerate(pages):
        bt[s, :p] = ids[off:off + p].to(torch.int32)
        off += p
    return kc, bt, torch.tensor(lens, dtype=torch.int32)


def rows_of(kc: kq.KeyCodes, bt, sl):
    """What the copy holds for the rows' tokens (codes and the bounds of their groups), for comparisons."""
    out = []
    for s, n in enumerate(sl.tolist()):
        out.append(kq.dequantize(kc, bt[s], n))
        out.append(gather_paged(kc.codes, bt[s], n).float())
    return out


def token_bounds(kc: kq.KeyCodes, bt_row, n):
    """Each of a row's first n tokens' group minimum and step: [Hkv, n, D] float32 each (the group's bounds sit
    spread over its GROUP slots)."""
    groups = -(-n // kq.GROUP)
    b = gather_paged(kc.bounds, bt_row, groups * kq.GROUP).float()  # [Hkv, groups * GROUP, 2D / GROUP]
    b = b.reshape(b.shape[0], groups, 2, -1).repeat_interleave(kq.GROUP, 1)[:, :n]
    return b[:, :, 0], b[:, :, 1]


def appended(kc, bt, sl, impl, fmt):
    """A copy of format fmt encoded as keys arrive a few at a time (0-39 per row and step: decode steps, chunked
    prefill)."""
    page, hkv, d = kc.shape[1:]
    step = kq.key_codes(kc.shape[0], page, hkv, d, "cpu", fmt)
    done = torch.zeros_like(sl)
    gen = torch.Generator().manual_seed(3)
    while bool((done < sl).any()):
        new = torch.minimum(torch.randint(0, 40, sl.shape, generator=gen, dtype=torch.int32), sl - done)
        kq.encode_keys(kc, step, bt, done + new, new, impl=impl)
        done += new
    return step


def assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_rounding_rule_written_out():
    """One group of one head, by hand: minimum and step (range / 15, float16) per channel, codes rounded to the
    nearest level, two channels a byte (j low, j + D/2 high); tokens past the row's length neither count nor keep
    codes."""
    kc, bt, sl = cache([21], 1, 8, 16, seed=1)
    codes = kq.key_codes(kc.shape[0], 16, 1, 8, "cpu")
    kq.encode_keys(kc, codes, bt, sl, sl.clone(), impl="torch")
    p = int(bt[0, 1])  # the second group: tokens 16..20 valid
    k = kc[p, :5, 0].float()
    lo = k.amin(0).half().float()
    step = ((k.amax(0) - k.amin(0)) / 15).clamp(min=2 ** -14).half().float()
    code = torch.floor((k - lo) / step + 0.5).clamp(0, 15).to(torch.uint8)
    bounds = codes.bounds[p, :16, 0].float().reshape(2, 8)  # spread over the group's 16 slots, one value each
    assert torch.equal(bounds[0], lo) and torch.equal(bounds[1], step)
    assert torch.equal(codes.codes[p, :5, 0], code[:, :4] | (code[:, 4:] << 4))
    assert torch.all(codes.codes[p, 5:] == 0)


@pytest.mark.parametrize("page", [16, 64])
def test_error_is_half_a_step(page):
    """Every key the copy reads back lies within half a step (plus float16's rounding of the minimum) of the key,
    and a channel constant over a group reads back as its value."""
    kc, bt, sl = cache([200, 33], 2, 64, page, seed=2)
    kc[:, :, :, 5] = 1.25  # constant channel
    codes = kq.key_codes(kc.shape[0], page, 2, 64, "cpu")
    kq.encode_keys(kc, codes, bt, sl, sl.clone(), impl="torch")
    for s, n in enumerate(sl.tolist()):
        k = gather_paged(kc, bt[s], n).float()  # [Hkv, n, D]
        back = kq.dequantize(codes, bt[s], n)
        lo, step = token_bounds(codes, bt[s], n)
        assert torch.all((back - k).abs() <= step / 2 + (lo.abs() * 2 ** -11) + 1e-6)
        assert torch.all(back[:, :, 5] == 1.25)


CASES = [  # (lens, Hkv, D, page)
    ([1, 17, 100], 2, 32, 16),
    ([300, 64], 1, 48, 32),  # D / 2 = 24: a padded half, 6 bounds per slot
    ([129, 47], 4, 128, 64),
]


@TRITON
@pytest.mark.parametrize("lens, hkv, d, page", CASES)
def test_triton_equals_the_twin_and_appends_equal_one_encode(lens, hkv, d, page):
    """The kernel writes what the twin writes, for a whole prompt and for keys appended a few at a time (decode
    steps, chunked prefill): every group that got a key is re-rounded over its tokens so far."""
    kc, bt, sl = cache(lens, hkv, d, page, seed=len(lens) + d)
    whole = {}
    for impl in ("torch", "triton"):
        whole[impl] = kq.key_codes(kc.shape[0], page, hkv, d, "cpu")
        kq.encode_keys(kc, whole[impl], bt, sl, sl.clone(), impl=impl)
    assert_same(rows_of(whole["torch"], bt, sl), rows_of(whole["triton"], bt, sl))
    for impl in ("torch", "triton"):
        assert_same(rows_of(appended(kc, bt, sl, impl, "int4"), bt, sl), rows_of(whole["torch"], bt, sl))


@TRITON
def test_rows_without_new_keys_are_untouched():
    kc, bt, sl = cache([50, 80], 2, 32, 16, seed=4)
    codes = kq.key_codes(kc.shape[0], 16, 2, 32, "cpu")
    codes.codes.fill_(0xAB)
    kq.encode_keys(kc, codes, bt, sl, torch.tensor([0, 5], dtype=torch.int32), impl="triton")
    assert torch.all(gather_paged(codes.codes, bt[0], 50) == 0xAB)
    assert torch.all(gather_paged(codes.codes, bt[1], 64) == 0xAB)  # the groups before the new keys' own
    assert not torch.all(gather_paged(codes.codes, bt[1], 80)[:, 64:] == 0xAB)


def test_bad_inputs_are_named():
    kc, bt, sl = cache([50], 2, 32, 16)
    good = kq.key_codes(kc.shape[0], 16, 2, 32, "cpu")
    with pytest.raises(ValueError, match="page_size % 16"):
        kq.key_codes(4, 8, 2, 32, "cpu")
    with pytest.raises(ValueError, match="divisible by 8"):
        kq.key_codes(4, 16, 2, 36, "cpu")
    with pytest.raises(ValueError, match="codes must be uint8"):
        kq.encode_keys(kc, kq.KeyCodes(good.codes[:, :, :1], good.bounds), bt, sl, sl.clone())
    with pytest.raises(ValueError, match="bounds must be float16"):
        kq.encode_keys(kc, kq.KeyCodes(good.codes, good.bounds.float()), bt, sl, sl.clone())
    with pytest.raises(ValueError, match="must be a KeyCodes"):
        kq.encode_keys(kc, (good.codes, good.bounds), bt, sl, sl.clone())
    with pytest.raises(ValueError, match="num_new must be int32"):
        kq.encode_keys(kc, good, bt, sl, sl.long())


def test_bytes_per_token():
    """3/8 of a 16-bit key: D/2 bytes of codes and 4D/16 of bounds per head."""
    assert kq.bytes_per_token(8, 128) == 8 * (64 + 32)
    assert kq.bytes_per_token(8, 128) * 8 == 3 * 8 * 128 * 2


@pytest.mark.gpu
def test_gpu_encode_equals_the_twin():
    """On a GPU (bf16, 8B geometry): the kernel's copy reads back within one level of the twin's (the GPU's float
    division may round a key across a level boundary), bounds equal."""
    kc, bt, sl = cache([5000, 700], 8, 128, 16, seed=5, dtype=torch.bfloat16)
    kc, bt, sl = kc.cuda(), bt.cuda(), sl.cuda()
    ref = kq.key_codes(kc.shape[0], 16, 8, 128, "cuda")
    got = kq.key_codes(kc.shape[0], 16, 8, 128, "cuda")
    kq.encode_keys(kc, ref, bt, sl, sl.clone(), impl="torch")
    kq.encode_keys(kc, got, bt, sl, sl.clone(), impl="triton")
    for s, n in enumerate(sl.tolist()):
        a, b = kq.dequantize(ref, bt[s], n), kq.dequantize(got, bt[s], n)
        step = token_bounds(ref, bt[s], n)[1]
        assert torch.all((a - b).abs() <= step * 1.001)
        assert all(torch.equal(x, y) for x, y in zip(token_bounds(ref, bt[s], n), token_bounds(got, bt[s], n)))


@TRITON
@pytest.mark.parametrize("m", [1, 2, 15, 16, 17, 18, 33])
def test_the_grid_covers_every_group_a_run_of_new_keys_touches(m):
    """max_new = m: a run of m keys from any offset in its first group (up to ceil((m - 1) / 16) + 1 groups) is
    encoded whole, as the twin encodes it."""
    kc, bt, sl = cache([64 + 16 + m], 1, 16, 16, seed=m)
    for start in range(16):
        n = 48 + start + m
        got, want = (kq.key_codes(kc.shape[0], 16, 1, 16, "cpu") for _ in range(2))
        ln, new = torch.tensor([n], dtype=torch.int32), torch.tensor([m], dtype=torch.int32)
        kq.encode_keys(kc, got, bt, ln, new, max_new=m, impl="triton")
        kq.encode_keys(kc, want, bt, ln, new, impl="torch")
        assert_same(rows_of(got, bt, ln), rows_of(want, bt, ln))


# -- the "fp8" format: each channel centered on its group's mid-range, the rest float8 e4m3 scaled per token --------
FP8_CASES = [  # (lens, Hkv, D, page)
    ([1, 17, 100], 2, 32, 16),
    ([300, 64], 1, 48, 32),  # 3 mid-range values per slot
    ([129, 47], 4, 128, 64),
]


def fp8_copy(kc, bt, sl, impl="torch"):
    codes = kq.key_codes(kc.shape[0], kc.shape[1], kc.shape[2], kc.shape[3], "cpu", "fp8")
    return kq.encode_keys(kc, codes, bt, sl, sl.clone(), impl=impl)


def test_fp8_rule_written_out():
    """One group of one head, by hand: each channel's mid-range over the valid tokens (float16), each token's largest
    magnitude after centering (float16), the codes e4m3 of (k - mid) / (that / 448); the mid-range spread over the
    group's slots (D / 16 values each), each token's magnitude last in its slot; tokens past the row's length keep
    code 0 and magnitude 0."""
    kc, bt, sl = cache([21], 1, 32, 16, seed=1)
    codes = fp8_copy(kc, bt, sl)
    p = int(bt[0, 1])  # the second group: tokens 16..20 valid
    k = kc[p, :5, 0].float()
    mid = ((k.amax(0) + k.amin(0)) / 2).half().float()
    amax = (k - mid).abs().amax(-1).clamp(min=2 ** -14).half().float()
    code = ((k - mid) / (amax / 448)[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(codes.codes[p, :5, 0], code)
    assert torch.all(codes.codes[p, 5:, 0] == 0)
    b = codes.bounds[p, :, 0].float()  # [16, 3]
    assert torch.equal(b[:, :2].reshape(32), mid)
    assert torch.equal(b[:5, 2], amax) and torch.all(b[5:, 2] == 0)


@pytest.mark.parametrize("page", [16, 64])
def test_fp8_error_is_float8s(page):
    """Every key the copy reads back lies within e4m3's half ulp (2^-4 relative, 2^-10 of the scale below its normal
    range) of the centered key, plus float16's rounding of mid and scale; a channel constant over a group reads back
    as its float16 value."""
    kc, bt, sl = cache([200, 33], 2, 64, page, seed=2)
    kc[:, :, :, 5] = 1.25
    codes = fp8_copy(kc, bt, sl)
    for s, n in enumerate(sl.tolist()):
        k = gather_paged(kc, bt[s], n).float()
        back = kq.dequantize(codes, bt[s], n)
        r8, scale, mid = kq._fp8_parts(codes, bt[s], n)
        r = k - mid
        tol = r.abs() * 2 ** -4 + scale[..., None] * 448 * 2 ** -10 + 1e-6
        assert torch.all((back - k).abs() <= tol)
        assert torch.all(back[:, :, 5] == 1.25)
    assert float((back - k).norm() / k.norm()) < 0.03


@TRITON
def test_fp8_bits_round_as_pytorch():
    """The kernels' float32 -> e4m3 rounding (integer arithmetic, fp8_bits) gives PyTorch's bits for every e4m3
    value, every midpoint between two (ties to even), both zeros and random values over the whole range."""
    import triton
    import triton.language as tl

    @triton.jit
    def bits(x_ptr, o_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(o_ptr + i, kq.fp8_bits(tl.load(x_ptr + i)))

    vals = kq.fp8_values(torch.arange(256, dtype=torch.uint8))
    s = torch.sort(vals[torch.isfinite(vals)].unique()).values
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([s, (s[1:] + s[:-1]) / 2, torch.tensor([-0.0, 447.9, -447.99, 2 ** -6, 3 * 2 ** -10]),
                   torch.randn(3000, generator=gen) * 60, torch.randn(1000, generator=gen) * 0.01]).clamp(-448, 448)
    xp = torch.zeros(8192)
    xp[:x.numel()] = x
    out = torch.zeros(8192, dtype=torch.uint8)
    bits[(1,)](xp, out, N=8192)
    assert torch.equal(out, xp.to(torch.float8_e4m3fn).view(torch.uint8))


@TRITON
@pytest.mark.parametrize("lens, hkv, d, page", FP8_CASES)
def test_fp8_triton_equals_the_twin_and_appends_equal_one_encode(lens, hkv, d, page):
    kc, bt, sl = cache(lens, hkv, d, page, seed=len(lens) + d + 7)
    ref = fp8_copy(kc, bt, sl)
    assert_same(rows_of(ref, bt, sl), rows_of(fp8_copy(kc, bt, sl, "triton"), bt, sl))
    for impl in ("torch", "triton"):
        assert_same(rows_of(appended(kc, bt, sl, impl, "fp8"), bt, sl), rows_of(ref, bt, sl))


def test_fp8_estimate_is_the_keys_read_back():
    """estimate: the exact queries against the keys the copy reads back as (s_k (q . k8) + q . mid): close to the
    exact scores, not equal to them."""
    kc, bt, sl = cache([90], 2, 32, 16, seed=6)
    codes = fp8_copy(kc, bt, sl)
    q = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(6))
    est = kq.estimate(q, codes, bt[0], 90)
    assert torch.allclose(est, torch.einsum("hgd,hnd->hgn", q, kq.dequantize(codes, bt[0], 90)), rtol=1e-5,
                          atol=1e-4)
    exact = torch.einsum("hgd,hnd->hgn", q, gather_paged(kc, bt[0], 90).float())
    err = float((est - exact).abs().max())
    assert 0 < err < 0.05 * float(exact.abs().max())


def test_fp8_geometry_and_bytes():
    """D + 2 (D / 16 + 1) bytes per token and head (57% of a bf16 key at D = 128); a head dim must be a multiple of
    16 and at least 32 (a float8 dot's depth); a wrong-format copy is named."""
    assert kq.bytes_per_token(8, 128, "fp8") == 8 * (128 + 18)
    assert kq.page_tail_bytes(16, 8, 128, "fp8") % 16 == 0
    with pytest.raises(ValueError, match="divisible by 16 and at least 32"):
        kq.key_codes(4, 16, 2, 24, "cpu", "fp8")
    with pytest.raises(ValueError, match="format must be one of"):
        kq.key_codes(4, 16, 2, 32, "cpu", "int8")
    kc, bt, sl = cache([50], 2, 32, 16)
    int4 = kq.key_codes(kc.shape[0], 16, 2, 32, "cpu")
    with pytest.raises(ValueError, match="codes must be uint8"):
        kq.encode_keys(kc, kq.KeyCodes(int4.codes, int4.bounds, "fp8"), bt, sl, sl.clone())


@pytest.mark.gpu
def test_gpu_fp8_encode_equals_the_twin():
    """On a GPU (bf16, 8B geometry): mid-ranges and magnitudes equal the twin's; codes within one e4m3 step (the
    GPU's float division may round a value across a midpoint)."""
    kc, bt, sl = cache([5000, 700], 8, 128, 16, seed=5, dtype=torch.bfloat16)
    kc, bt, sl = kc.cuda(), bt.cuda(), sl.cuda()
    ref = kq.key_codes(kc.shape[0], 16, 8, 128, "cuda", "fp8")
    got = kq.key_codes(kc.shape[0], 16, 8, 128, "cuda", "fp8")
    kq.encode_keys(kc, ref, bt, sl, sl.clone(), impl="torch")
    kq.encode_keys(kc, got, bt, sl, sl.clone(), impl="triton")
    for s, n in enumerate(sl.tolist()):
        assert torch.equal(gather_paged(ref.bounds, bt[s], n), gather_paged(got.bounds, bt[s], n))
        a = kq.fp8_values(gather_paged(ref.codes, bt[s], n))
        b = kq.fp8_values(gather_paged(got.codes, bt[s], n))
        assert torch.all((a - b).abs() <= a.abs() * 2 ** -3 + 2 ** -9)
        assert float((a != b).float().mean()) < 1e-3
