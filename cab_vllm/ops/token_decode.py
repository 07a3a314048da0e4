"""Token-sparse decode over vLLM's paged KV cache: each query head attends to its own ``keep`` highest-scoring keys,
ranked by their exact scores (decode_rule="tokens"). With two counting passes (PASSES 2), five launches (the threshold
one runs twice); with one (PASSES 1, the default) three: 1, 2 and 5 below.

  1. logits     one program per (row, KV head, chunk of CHUNK tokens): the group's queries against every key of the
                chunk, read in place from the paged cache; base-2 logits (scale x log2 e folded in) into a scratch
                [rows, Hq, NPAD] float32, each head's maximum over the chunk, and the first counting pass over the
                chunk: per head, how many of its keys fall in each of BUCKETS buckets of STEP_A on an absolute grid,
                from the bucket of the chunk's maximum down (the logits read back from L2 right after they are
                stored, head by head).
  2. threshold  one program per (row, query head): the chunks' counts, each shifted from its chunk's maximum onto
                the row's, summed: the bucket A that holds the keep-th largest key (a window of BUCKETS x STEP_A).
  3. counts     one program per (row, query head, COUNT_CHUNK logits): how many of the keys in bucket A fall in
                each of BUCKETS buckets of STEP_B = STEP_A / BUCKETS.
  4. threshold  again: the bucket B inside A that holds the keep-th largest key: the head keeps every key above it
                and in it (the keep best, and those within STEP_B of the keep-th: ties at 0.002 of a base-2 logit;
                when bucket B holds more than TIE_SLACK keys beyond those needed, only about the needed number of
                them, by a hash of their positions: tie_cut), or every key of the window when fewer than keep are
                in it (the others weigh under 2^-31 of the best key); and how many it keeps.
  (PASSES 1, the default: launches 3 and 4 do not run; the first threshold launch keeps every key above bucket A and
  samples bucket A's keys, STEP_A wide, by position hash down to the number needed: one launch and one pass over the
  logits fewer, about keep keys kept; the boundary bucket's keys are sampled, not its best. 10-12 us less a layer at
  128k x 1 on an H100 or H200, BENCHMARKS.md, thirtieth run.)
  5. attention  one program per (row, KV head, split of the row's 64-token tiles), in two phases: a scan of the
                split's stored logits writes the positions some head of the group keeps into a compacted list, then
                an online softmax runs over the list, ATTEND_TILE keys per step (values of listed keys only; each
                head's own threshold masks the others'); the last split of a (row, KV head) merges the partials
                (ops.decode's merge). A step per 64-token tile instead, mostly empty at high sparsity, was a chain
                of dependent loads per tile: 2.4-3.5x slower (BENCHMARKS.md, twenty-sixth run).

What it reads per layer and row: every key once (launch 1; what a selector that scores every key exactly must read),
the logits once more (the attention's scan; with two passes the second count reads them too; with fp32 logits and
32/8 heads of dimension 128 each read is 6% of the keys' bytes), and the kept keys' values. On an H100 at 128k the
first launch reads the keys at 73% of the memory's peak bandwidth (Nsight Compute: BENCHMARKS.md, thirty-third run).
Every launch spreads over the row's chunks or splits: no program scans a whole row (one program per head that scans
it several times, as a radix select would, runs on a few SMs), and the histograms have 128 buckets (Triton builds
tl.histogram from warp ballots, whose cost per key grows with the bucket count). Each launch is bound by memory
latency unless many programs are in flight. Reading every key is this rule's floor: box bounds of key blocks rule out
no block of a KV group on a real model (experiments/RESULTS.md, "Block bounds do not let an exact token decode skip
keys"). (A fixed subset of each key's dimensions is no cheaper scorer either: experiments/RESULTS.md, "Fixed
dimensions do not rank keys".)

With a 4-bit copy of K (codes=, ops.key_codes: 3/8 of a bf16 key's bytes) launch 1 scores every key by the copy
instead, launches 2-4 pick each head's rerank x keep best by that estimate (its candidates), and a rescoring launch,
one program per (row, KV head, chunk), compacts the chunk's candidates into a list (the -inf of the others written
over their estimates), reads those keys from the cache and writes their exact logits, with the chunk's maxima and
first counts; launches 2-4 then run again on the exact logits for keep, and the attention is unchanged (every key
it can keep is a candidate: the rest are -inf).

With a float8 copy (codes of fmt "fp8": each channel centered on its 16-token group's mid-range, the rest e4m3
scaled per token, 57% of a bf16 key's bytes at D=128) launch 1 scores every key by the keys the copy reads back as
(the codes made float16 for the 16-row dot, plus a dot against the groups' centers spread over their keys: key_codes.
fp8_estimate), launches 2-4 pick each head's keep best by that estimate, and the attention reads the listed keys from
the cache and takes their exact scores (no rescoring launch; the estimates only pick the keys).

With PASSES 0 (sampled_rule) there are three launches: the exact logits of every s-th key (s = keep // SAMPLE_Q
within 1..SAMPLE), each head's threshold from them (a bisection for their round(keep / s)-th largest), and one launch
split as the attention is that computes every key's logit and runs the online softmax over the keys at or above the
threshold in the same step (no stored logits, counting or scan; about keep keys per head, not exactly). On an H100
it is 0.93-0.94x the counting rule's time at 128k x 1 and 1.13-1.16x at 32k x 1 with a workspace sized for 32k
(BENCHMARKS.md, thirty-second run), 0.96x at both with one sized for 128k, as an engine of that max_model_len sizes it
(thirty-third run): its key-reading launch, heavier by the softmax, bounds it as the logits launch bounds the
counting rule.

CUDA-graph safe: fixed grids (the rows and the engine's longest context, NPAD), every count read on the device; rows
with keep 0 return at once and are not written. Twin: token_decode_torch (the same rule in PyTorch: the CPU path and
the reference of the tests).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from cab_vllm.ops._triton import HAS_TRITON, check, next_pow2, resolve_impl
from cab_vllm.ops.key_codes import GROUP as CODE_GROUP
from cab_vllm.ops.key_codes import FP8_MAX, KeyCodes, check_codes, estimate
from cab_vllm.ops.prefill import _check_common

LOG2E = 1.4426950408889634
TILE = 64  # tokens per step of the logits loop (and the unit of the attention's splits)
ATTEND_TILE = 32  # listed keys per step of the attention (a power of two >= 16)
SCAN_TILE = 512  # logits per step of the attention's scan
CHUNK = 1024  # tokens per program of the logits launch (and per stored maximum)
LOGITS_TILE = 128  # keys per step of a logits program (a power of two dividing CHUNK; 64: up to 1.2x slower on an H100)
FP8_TILE = 128  # keys per step with a float8 key copy
# the float8 copy's logits launch: its codes load into registers (no asynchronous copies), so registers bound the
# programs in flight: 1 stage, at most 128 registers, running maxima reduced once (H100 at 128k x 1: 116.7 us
# against 121.8-162.9 with 2-3 stages or no register cap; BENCHMARKS.md)
FP8_STAGES, FP8_MAXNREG = 1, 128
LOGITS_WARPS, LOGITS_STAGES, ATTEND_WARPS = 4, 3, 4  # warps per program (and the logits loop's pipeline stages)
ATTEND_MAXNREG, LOGITS_MAXNREG = 128, 0  # registers per thread at most in those launches (0: the compiler's choice)
COUNT_CHUNK = 4096  # logits per program of a counting launch (and per stored histogram)
BUCKETS = 128  # buckets per counting pass
STEP_A = 0.25  # first-pass bucket width, base-2 logits: BUCKETS of them from the max's bucket, 31.75-32 below the max
STEP_B = STEP_A / BUCKETS  # width of the second pass's buckets (1/512)
COUNT_TILE = 1024  # logits per step of a counting program
COUNT_ATOMIC = True  # the second counting pass adds each key of bucket A to its head's counts (else a histogram)
TARGET_PROGRAMS = 264  # attention programs a step aims for at least (split over the row's tiles)
TILES_PER_SPLIT = 32  # and a split reads at most this many tiles at max_len (unless MAX_SPLITS caps the splits)
MAX_SPLITS = 64  # (128 splits of 16 tiles at 128k: +10 us at one row and +51 at eight on an H100, the merge's tail)
MIN_TILES_PER_SPLIT = 8  # a split reads at least this many tiles' logits
SCRATCH_BYTES = 256 << 20  # logits held at once: more rows than fit run in groups of launches
HIST_LOAD = 32  # counting chunks' histograms summed per load (32 x 128 int32: 16 KiB)
PASSES = 1  # counting passes: 1 samples bucket A by position hash (kept_keys); 2 pins the keep-th key to STEP_B
TIE_SLACK = 16  # tied keys (bucket B) a head keeps beyond its budget before the tie cap picks among them (tie_cut)
TIE_MULT = 2654435769  # 2^32 / golden ratio: tie_hash's multiplier
SEL = 8  # int32 slots per head of the thresholds (sel): A, B, kept count, the max's bucket (float32 bits), tie cut
ALL = BUCKETS + 1  # a first-pass threshold bucket past every key's: the head keeps every key
RERANK = 2  # with a 4-bit key copy: candidates per kept key, ranked by the copy, then narrowed by exact score
CODE_ASM = False  # 16-bit caches on a GPU: the copy's nibbles made float16 four at a time in inline PTX (not timed yet)
MAX_RERANK = 64
# PASSES 0: no counting; each head's threshold from a sample of its exact logits, then one launch that scores every
# key and attends to those at or above it (sampled_rule)
SAMPLE = 16  # at most one key in SAMPLE sampled (every SAMPLE-th position) ...
SAMPLE_Q = 64  # ... and at least about SAMPLE_Q sampled keys above the threshold: the stride is keep // SAMPLE_Q
SAMPLE_RANGE = 32.0  # the threshold lies at most this far below the sample's maximum (base-2 logits; 2^-32 weights)
SAMPLE_ITERS = 16  # bisection steps: the threshold within SAMPLE_RANGE / 2^16 (0.0005) of the sample's quantile
SAMPLE_TILE = 128  # sampled keys per step of the sampling launch
SAMPLE_SEL_TILE = 8192  # sampled logits the threshold launch holds in registers (more: read again per bisection step)
FUSED_TILE = 128  # keys per step of the one-pass attention
FUSED_CHUNK = 1024  # keys per program of the one-pass attention at max_len (more programs for fewer rows)
FUSED_MIN_TILES = 2  # and at least this many steps per program
FUSED_WARPS, FUSED_STAGES, FUSED_MAXNREG = 4, 1, 128  # its warps per program, pipeline stages, registers (0: any)


def kept_keys(logits: torch.Tensor, keep: int, passes: int | None = None) -> torch.Tensor:
    """The selection rule, [..., n] float32 base-2 logits -> [..., n] bool (every key when keep >= n). Keys fall in
    buckets of STEP_A on an absolute grid, numbered down from the one of the row's maximum: a = floor(-z / STEP_A) -
    floor(-max / STEP_A), capped at BUCKETS (past the window); A is the bucket holding the keep-th largest key
    (BUCKETS when fewer than keep are in the window), and inside their own bucket keys fall in BUCKETS buckets of
    STEP_B = STEP_A / BUCKETS, b; B is the one holding the keep-th; kept: a < A, or a == A and b <= B. So the keep
    best and every key within STEP_B of the keep-th, or, when fewer than keep keys lie in the window (31.75-32 below
    the maximum), those. Unless bucket B holds more than TIE_SLACK keys beyond those it needs (tie_cut): then only
    about the number it needs of them, picked by a hash of their positions, so ties cannot make a head keep more
    than about keep + TIE_SLACK keys. With passes 1 (PASSES unless given) there is no bucket B: every key above
    bucket A, and of bucket A's keys (STEP_A wide: weights within 2^0.25 of each other) about the number needed,
    by position hash."""
    return _rule(logits, keep, passes)[0]


def sample_stride(keep: int) -> int:
    """PASSES 0: the sampling stride of a row whose heads keep ``keep`` keys: keep // SAMPLE_Q within 1..SAMPLE."""
    return max(1, min(SAMPLE, keep // SAMPLE_Q))


def sampled_threshold(sample: torch.Tensor, keep: int, stride: int) -> torch.Tensor:
    """PASSES 0: each head's threshold from its sampled base-2 logits sample [..., m] (keys 0, stride, 2 stride, ...)
    -> [...] float32: the sample's k-th largest, k = round(keep / stride) within 1..m, found as the kernel finds it:
    SAMPLE_ITERS bisection steps between the sample's maximum less SAMPLE_RANGE and its maximum, keeping the lower
    end where at least k sampled logits lie at or above it (so never above the k-th largest, at most SAMPLE_RANGE /
    2^SAMPLE_ITERS below it, and at most SAMPLE_RANGE below the maximum)."""
    m = sample.shape[-1]
    k = max(1, min(m, (keep + stride // 2) // stride))
    z = sample.float()
    hi = z.amax(-1)
    lo = hi - SAMPLE_RANGE
    for _ in range(SAMPLE_ITERS):
        mid = (lo + hi) * 0.5
        big = (z >= mid[..., None]).sum(-1) >= k
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    return lo


def sampled_rule(logits: torch.Tensor, keep: int) -> torch.Tensor:
    """PASSES 0's selection, [..., n] float32 base-2 logits -> [..., n] bool: every key at or above its head's
    sampled_threshold over the logits of keys 0, s, 2 s, ... (s = sample_stride(keep)); every key when keep >= n.
    About keep keys (the sample's quantile: a relative spread of about 1 / sqrt(keep / s)), each head's best."""
    n = logits.shape[-1]
    if keep >= n:
        return torch.ones_like(logits, dtype=torch.bool)
    st = sample_stride(keep)
    return logits >= sampled_threshold(logits[..., ::st], keep, st)[..., None]


def _rule(logits: torch.Tensor, keep: int, passes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """kept_keys, and which heads [..., 1] the tie cap cut (their kept count is reported as keep, as the kernels do:
    the hash keeps about that many)."""
    n = logits.shape[-1]
    uncut = torch.zeros(*logits.shape[:-1], 1, dtype=torch.bool, device=logits.device)
    if keep >= n:
        return torch.ones_like(logits, dtype=torch.bool), uncut
    if (PASSES if passes is None else passes) == 0:
        return sampled_rule(logits, keep), uncut
    a, b = _buckets(logits.float())
    big_a, above = _bucket_of(a, keep)  # [..., 1]
    pos = torch.arange(n, device=logits.device).expand_as(a)
    if (PASSES if passes is None else passes) == 1:  # bucket A sampled by position hash down to the keys it needs
        tie = (a == big_a) & (big_a < BUCKETS)
        t = tie_cut(keep - above, tie.sum(-1, keepdim=True), slack=0)
        return (a < big_a) | (tie & ((t < 0) | (tie_hash(pos) < t))), t >= 0
    b = torch.where(a == big_a, b, BUCKETS)
    big_b, above_b = _bucket_of(b, keep - above)
    tie = (a == big_a) & (big_a < BUCKETS) & (b == big_b)
    here = tie.sum(-1, keepdim=True)
    t = tie_cut(keep - above - above_b, here)
    kept = (a < big_a) | ((a == big_a) & (big_a < BUCKETS) & (b < big_b)) | (tie & ((t < 0) | (tie_hash(pos) < t)))
    return kept, t >= 0


def tie_cut(need, here, slack: int | None = None):
    """The tie cap: a head whose threshold bucket (its keep-th key's, STEP_B wide) holds ``here`` keys, of which it
    needs ``need``, keeps them all when here <= need + TIE_SLACK (-1 returned), else only the keys whose tie_hash is
    below the returned cut need x 2^31 // here (about ``need`` of them, spread over the positions): when many keys
    score alike (a flood of ties: repeated text, or a model whose keys all score the same) the head keeps about its
    budget, not every tied key. Tensors or ints (int64 arithmetic); slack: TIE_SLACK unless given (0 with PASSES 1)."""
    need = torch.as_tensor(need, dtype=torch.long)
    here = torch.as_tensor(here, dtype=torch.long, device=need.device)
    slack = TIE_SLACK if slack is None else slack
    return torch.where(here > need + slack, (need << 31) // here.clamp(min=1), -1)


def tie_hash(pos: torch.Tensor) -> torch.Tensor:
    """A key position's place among its ties, 0..2^31-1: the low 32 bits of pos x 2654435769 (Fibonacci hashing:
    consecutive positions spread evenly), halved; the kernels' uint32 arithmetic, in int64."""
    return ((pos.long() * TIE_MULT) & 0xFFFFFFFF) >> 1


def _buckets(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First-pass buckets of z [..., n] (BUCKETS past the window) and their second-pass buckets, int64. The same
    float32 operations as the kernels' (exact: the steps are powers of two)."""
    u = -z * (1.0 / STEP_A)
    ab = torch.floor(u)
    top = ab.amin(-1, keepdim=True)  # the maximum's bucket
    a = torch.clamp(ab - top, max=float(BUCKETS)).long()
    b = torch.clamp((u - (top + a.float())) * float(BUCKETS), min=0.0, max=float(BUCKETS - 1)).long()
    return a, b


def _bucket_of(buckets: torch.Tensor, need) -> tuple[torch.Tensor, torch.Tensor]:
    """The bucket (of 0..BUCKETS-1, ascending = larger logits first) where the running count of ``buckets``
    [..., n] reaches ``need`` (BUCKETS when it does not), and the count in the buckets before it: [..., 1] each."""
    hist = torch.zeros(*buckets.shape[:-1], BUCKETS + 1, dtype=torch.long, device=buckets.device)
    hist.scatter_add_(-1, buckets, torch.ones_like(buckets))
    cum = hist[..., :BUCKETS].cumsum(-1)
    need = torch.as_tensor(need, device=buckets.device)
    at = (cum < need).sum(-1, keepdim=True)  # the first bucket whose running count reaches need
    before = torch.where(at > 0, cum.gather(-1, (at - 1).clamp(min=0).clamp(max=BUCKETS - 1)), 0)
    return at, before


def _check(q, key_cache, value_cache, block_table, seq_lens, keep, out, codes=None, rerank=RERANK, passes=None):
    hq, hkv, d = _check_common(q, key_cache, value_cache, block_table, seq_lens, 16)
    check(passes is None or (passes in (0, 1, 2) and not isinstance(passes, bool)),
          f"passes={passes!r} must be 0, 1 or 2 (counting passes; 0: a sampled threshold)")
    check(codes is None or (PASSES if passes is None else passes) != 0,
          "a key copy ranks keys by counting passes: passes=0 (a sampled threshold over exact scores) takes none")
    if codes is not None:
        check_codes(key_cache, codes)
        check(isinstance(rerank, int) and 1 <= rerank <= MAX_RERANK,
              f"rerank={rerank!r} must be an integer 1..{MAX_RERANK} (candidates per kept key)")
    check(q.dim() == 3, f"q must be [S, Hq, D], got {tuple(q.shape)}")
    ns = q.shape[0]
    check(block_table.shape[0] >= ns and seq_lens.shape[0] >= ns, "block_table and seq_lens must cover every row of q")
    check(keep.dim() == 1 and keep.shape[0] >= ns and keep.dtype == torch.int32 and keep.device == q.device,
          f"keep must be an int32 [S] tensor on q's device, got {tuple(keep.shape)} {keep.dtype} on {keep.device}")
    check(out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1,
          f"out must be like q {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    return hq, hkv, d


def token_decode_torch(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
                       seq_lens: torch.Tensor, keep: torch.Tensor, scale: float, out: torch.Tensor,
                       counts: torch.Tensor | None = None, codes: KeyCodes | None = None,
                       rerank: int = RERANK, passes: int | None = None) -> torch.Tensor:
    """PyTorch twin of token_decode (float32; one host read of the rows' lengths and budgets)."""
    from cab_vllm.ops.blocks import gather_paged

    hq, hkv, d = _check(q, key_cache, value_cache, block_table, seq_lens, keep, out, codes, rerank, passes)
    ns, g = q.shape[0], hq // hkv
    for s, (n, kt) in enumerate(zip(seq_lens[:ns].tolist(), keep[:ns].tolist())):
        if kt <= 0:
            continue
        k = gather_paged(key_cache, block_table[s], n).float()  # [Hkv, n, D]
        v = gather_paged(value_cache, block_table[s], n).float()
        qs = q[s].float().view(hkv, g, d)
        z = torch.einsum("hgd,hnd->hgn", qs, k) * (scale * LOG2E)
        if codes is not None and codes.fmt == "fp8":  # the estimate's keep best, attended by exact score
            sel, cut = _rule(estimate(qs, codes, block_table[s], n) * (scale * LOG2E), kt, passes)
        else:
            if codes is not None:  # the estimate's candidates, then the exact rule among them
                est = estimate(qs, codes, block_table[s], n) * (scale * LOG2E)
                z = z.masked_fill(~kept_keys(est, kt * rerank, passes), float("-inf"))
            sel, cut = _rule(z, kt, passes)
        sel &= z > float("-inf")
        z = z.masked_fill(~sel, float("-inf"))
        p = torch.exp2(z - z.amax(-1, keepdim=True))
        o = torch.einsum("hgn,hnd->hgd", p, v) / p.sum(-1, keepdim=True)
        out[s] = o.reshape(hq, d).to(out.dtype)
        if counts is not None:
            counts[s] = torch.where(cut[..., 0], kt, sel.sum(-1)).reshape(hq).to(counts.dtype)
    return out


class TokenScratch(NamedTuple):
    """Buffers of the token decode launches (fixed addresses for CUDA graphs), for up to ``rows`` rows at once:
    logits [rows, Hq, NPAD] float32 (NPAD >= the longest context), cmax [rows, Hq, NPAD / CHUNK] float32 (each chunk's
    largest logit per head), count_a [rows, Hq, NPAD / CHUNK, BUCKETS] and count_b [rows, Hq, NPAD / COUNT_CHUNK,
    BUCKETS] int32 (the counting passes), sel [rows, Hq, SEL] int32 (per head: the two threshold buckets, the kept
    count, the float32 bits of the maximum's absolute bucket and the tie cut, tie_cut's; with PASSES 0 the kept count
    and the float32 bits of the sampled threshold, slot 5; the logits then hold the sampled logits),
    part_o / part_lse flat float32 split partials for rows x Hq x the most splits (x D) (a launch of r rows views them
    as [r, Hq, splits(, D)], splits = num_splits(r, ...): fewer rows, more splits), lse [rows, Hq], sync [rows * Hkv]
    int32 zeros (the launch leaves them zero), kept [rows, Hkv, NPAD] int32 (each attention split's list of the
    positions some head of its group keeps, at the split's own offset; with a key copy, first each chunk's list of
    candidates), cand [rows] int32 (with a key copy: the candidates per head, rerank x keep)."""

    logits: torch.Tensor
    cmax: torch.Tensor
    count_a: torch.Tensor
    count_b: torch.Tensor
    sel: torch.Tensor
    part_o: torch.Tensor
    part_lse: torch.Tensor
    lse: torch.Tensor
    sync: torch.Tensor
    kept: torch.Tensor
    cand: torch.Tensor

    @property
    def rows(self) -> int:
        return self.logits.shape[0]

    def partials(self, rows: int, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """part_o [rows, Hq, splits, D] and part_lse [rows, Hq, splits] views (contiguous)."""
        hq, d = self.logits.shape[1], self.part_o.numel() // self.part_lse.numel()
        n = rows * hq * splits
        return self.part_o[: n * d].view(rows, hq, splits, d), self.part_lse[:n].view(rows, hq, splits)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)


def scratch_rows(num_heads: int, max_len: int, rows: int) -> int:
    """Rows one group of launches takes: all ``rows``, or as many as SCRATCH_BYTES of logits hold."""
    npad = -(-max(1, max_len) // TILE) * TILE
    return max(1, min(rows, SCRATCH_BYTES // (num_heads * npad * 4)))


def num_splits(rows: int, num_kv_heads: int, max_len: int) -> int:
    """Splits per (row, KV head) of the attention launch: TARGET_PROGRAMS programs at least and at most
    TILES_PER_SPLIT tiles per split at max_len, capped at MAX_SPLITS and at MIN_TILES_PER_SPLIT tiles per split."""
    tiles = -(-max(1, max_len) // TILE)
    want = max(-(-TARGET_PROGRAMS // max(1, rows * num_kv_heads)), -(-tiles // TILES_PER_SPLIT))
    return int(max(1, min(want, MAX_SPLITS, -(-tiles // MIN_TILES_PER_SPLIT))))


def fused_splits(rows: int, num_kv_heads: int, max_len: int) -> int:
    """PASSES 0: programs per (row, KV head) of the one-pass attention: one per FUSED_CHUNK keys of max_len, or
    TARGET_PROGRAMS over the rows' KV heads if more, at least FUSED_MIN_TILES steps each."""
    tiles = -(-max(1, max_len) // FUSED_TILE)
    want = max(-(-TARGET_PROGRAMS // max(1, rows * num_kv_heads)), -(-max(1, max_len) // FUSED_CHUNK))
    return int(max(1, min(want, -(-tiles // FUSED_MIN_TILES))))


def token_scratch(rows: int, num_heads: int, num_kv_heads: int, head_dim: int, max_len: int, device,
                  passes: int | None = None) -> TokenScratch:
    """A TokenScratch for launches of up to ``rows`` rows (scratch_rows: the engine's row cap) of contexts up to
    max_len, with partials for the most splits any launch of 1..rows rows takes (num_splits; with passes 0 (PASSES
    when None), also fused_splits: a sampled threshold's one-pass launch, up to twice as many at 128k)."""
    check(rows >= 1 and max_len >= 1, f"token scratch needs rows >= 1 and max_len >= 1, got {rows}, {max_len}")
    npad = -(-max_len // TILE) * TILE
    sampled = (PASSES if passes is None else passes) == 0
    cap = max(r * max(num_splits(r, num_kv_heads, max_len), fused_splits(r, num_kv_heads, max_len) if sampled else 0)
              for r in range(1, rows + 1))  # rows x splits, at most (the attention launch's)
    f32 = dict(dtype=torch.float32, device=device)
    chunks, cchunks = -(-npad // CHUNK), -(-npad // COUNT_CHUNK)
    i32 = dict(dtype=torch.int32, device=device)
    return TokenScratch(torch.zeros(rows, num_heads, npad, **f32), torch.zeros(rows, num_heads, chunks, **f32),
                        torch.zeros(rows, num_heads, chunks, BUCKETS, **i32),
                        torch.zeros(rows, num_heads, cchunks, BUCKETS, **i32), torch.zeros(rows, num_heads, SEL, **i32),
                        torch.zeros(cap * num_heads * head_dim, **f32), torch.zeros(cap * num_heads, **f32),
                        torch.zeros(rows, num_heads, **f32), torch.zeros(rows * num_kv_heads, **i32),
                        torch.zeros(rows, num_kv_heads, npad, **i32), torch.zeros(rows, **i32))


if HAS_TRITON:
    import triton
    import triton.language as tl

    from cab_vllm.ops._triton import paged_coords
    from cab_vllm.ops.decode import MERGE_SPLITS, _block_offsets, _merge_group, merge_tile
    from cab_vllm.ops.key_codes import dequant_halves, fp8_estimate
    from cab_vllm.ops.select import _group_query

    @triton.jit
    def _program_row(seqlen_ptr, keep_ptr, mids, inners):
        """This program's place in a grid of rows x mids x inners -> (row (int64), mid, inner), and the row's length
        and budget (keep)."""
        pid = tl.program_id(0)
        s = (pid // (mids * inners)).to(tl.int64)
        return s, (pid % (mids * inners)) // inners, pid % inners, tl.load(seqlen_ptr + s), tl.load(keep_ptr + s)

    @triton.jit
    def _abs_bucket(z, INV_A: tl.constexpr):
        """Buckets of base-2 logits z on the absolute grid: floor(-z / STEP_A), float32 (exact: STEP_A is a power of
        two)."""
        return tl.floor(-z * INV_A)

    @triton.jit
    def _chunk_counts(lg_ptr, ca_ptr, m, g, s, kvh, c, group, t0, t1, num_heads, n_chunks, stride_ls, stride_lh,
                      SCAN_G: tl.constexpr, RTILE: tl.constexpr, NB: tl.constexpr, INV_A: tl.constexpr):
        """Each head's first counting pass over its chunk's stored logits t0..t1-1 (read back from L2 head by head)
        into ca [rows, Hq, chunks, NB]: how many fall in each of the NB absolute buckets from the one of the chunk's
        maximum m [GROUP_PAD] down (-inf logits, a rescored chunk's dropped keys, in none)."""
        b = tl.arange(0, NB)
        for h in tl.static_range(SCAN_G):
            if h < group:
                top = _abs_bucket(tl.sum(tl.where(g == h, m, 0.0), 0), INV_A)
                hrow = lg_ptr + s * stride_ls + (kvh * group + h).to(tl.int64) * stride_lh
                hist = tl.zeros([NB], dtype=tl.int32)
                for i0 in range(t0, t1, RTILE):
                    i = i0 + tl.arange(0, RTILE)
                    z = tl.load(hrow + i, mask=i < t1, other=float("-inf"), cache_modifier=".cg")
                    ok = z > float("-inf")
                    a = tl.where(ok, tl.minimum(_abs_bucket(tl.where(ok, z, 0.0), INV_A) - top, NB), NB).to(tl.int32)
                    hist += tl.histogram(tl.maximum(tl.minimum(a, NB - 1), 0), NB, mask=a < NB)
                tl.store(ca_ptr + ((s * num_heads + kvh * group + h) * n_chunks + c) * NB + b, hist)

    @triton.jit(do_not_specialize=["n_chunks"])
    def _logits_kernel(q_ptr, k_ptr, c_ptr, b_ptr, bt_ptr, seqlen_ptr, keep_ptr, lg_ptr, cm_ptr, ca_ptr, scale_log2,
                       num_heads, num_kv_heads, n_chunks, stride_qs, stride_qh, stride_kpage, stride_kpos, stride_kh,
                       stride_cpage, stride_cpos, stride_ch, stride_bpage, stride_bpos, stride_bh, stride_bt,
                       stride_ls, stride_lh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_PAD: tl.constexpr,
                       SCAN_G: tl.constexpr, CHUNK_T: tl.constexpr, TILE_T: tl.constexpr, RTILE: tl.constexpr,
                       PAGE_SIZE: tl.constexpr, NB: tl.constexpr, INV_A: tl.constexpr, CODES: tl.constexpr,
                       CGROUP: tl.constexpr, BLOCK_H: tl.constexpr, EST_DT: tl.constexpr, CODE_ASM_T: tl.constexpr,
                       FP8: tl.constexpr = False, FMAX: tl.constexpr = 448.0):
        """Base-2 logits of the group's queries against the keys of one chunk of one row (CODES: against the keys
        the 4-bit copy reads back as, ops.key_codes; FP8: the float8 copy's estimate, fp8_estimate), each head's
        largest logit over the chunk into cm [rows, Hq, chunks], and (rows that keep fewer keys than they have) each
        head's first counting pass over the chunk (_chunk_counts; the select launch shifts the chunks' counts onto the
        row's maximum)."""
        s, kvh, c, n, kt = _program_row(seqlen_ptr, keep_ptr, num_kv_heads, n_chunks)
        t0 = c * CHUNK_T
        if (kt > 0) & (t0 < n):
            group = num_heads // num_kv_heads
            q, g_ok, d, d_ok = _group_query(q_ptr, s, kvh, group, stride_qs, stride_qh, HEAD_DIM, BLOCK_D, GROUP_PAD)
            q = q.to(k_ptr.dtype.element_ty)
            g = tl.arange(0, GROUP_PAD)
            if FP8:  # the queries in EST_DT (float16 for 16-bit caches: the dots' operand type)
                qc = q.to(EST_DT)
                ngl: tl.constexpr = 16 if TILE_T // CGROUP < 16 else TILE_T // CGROUP
                expand = (tl.arange(0, TILE_T)[None, :] // CGROUP == tl.arange(0, ngl)[:, None]).to(EST_DT)
                wc: tl.constexpr = HEAD_DIM // CGROUP
                cpart = (d // wc) * stride_bpos + d % wc
            elif CODES:  # the queries' two halves (what each byte of codes holds one channel of)
                e = tl.arange(0, BLOCK_H)
                e_ok = e < HEAD_DIM // 2
                qrow = q_ptr + s * stride_qs + (kvh * group + g)[:, None] * stride_qh + e[None, :]
                qm = g_ok[:, None] & e_ok[None, :]
                q_lo = tl.load(qrow, mask=qm, other=0.0).to(EST_DT)
                q_hi = tl.load(qrow + HEAD_DIM // 2, mask=qm, other=0.0).to(EST_DT)
            heads = kvh * group + g
            row = lg_ptr + s * stride_ls + heads[:, None].to(tl.int64) * stride_lh
            m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
            mz = tl.full([GROUP_PAD, TILE_T], float("-inf"), dtype=tl.float32)  # FP8: running maxima, reduced once
            t1 = tl.minimum(t0 + CHUNK_T, n)
            for p0 in range(t0, t1, TILE_T):
                pos = p0 + tl.arange(0, TILE_T)
                k_ok = pos < n
                if FP8:
                    z = fp8_estimate(qc, expand, cpart, c_ptr, b_ptr, bt_ptr, stride_bt, s, p0, n, kvh, d, d_ok,
                                     stride_cpage, stride_cpos, stride_ch, stride_bpage, stride_bpos, stride_bh,
                                     scale_log2, TILE_T, PAGE_SIZE, HEAD_DIM, CGROUP, FMAX, EST_DT)
                elif CODES:  # the copy's keys, a dot per half of the head dim
                    k_lo, k_hi = dequant_halves(c_ptr, b_ptr, bt_ptr, stride_bt, s, p0, n, kvh, e, e_ok, stride_cpage,
                                                stride_cpos, stride_ch, stride_bpage, stride_bpos, stride_bh, TILE_T,
                                                PAGE_SIZE, HEAD_DIM // 2, CGROUP, EST_DT, CODE_ASM_T)
                    z = (tl.dot(q_lo, tl.trans(k_lo)) + tl.dot(q_hi, tl.trans(k_hi))) * scale_log2
                else:
                    off = _block_offsets(bt_ptr, stride_bt, s, p0 // TILE_T, k_ok, kvh, stride_kpage, stride_kpos,
                                         stride_kh, d, TILE_T, PAGE_SIZE)
                    k = tl.load(k_ptr + off, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
                    z = tl.dot(q, tl.trans(k)) * scale_log2
                live = g_ok[:, None] & k_ok[None, :]
                tl.store(row + pos[None, :], z, mask=live)
                if FP8:
                    mz = tl.maximum(mz, tl.where(live, z, float("-inf")))
                else:
                    m = tl.maximum(m, tl.max(tl.where(live, z, float("-inf")), 1))
            if FP8:
                m = tl.max(mz, 1)
            tl.store(cm_ptr + (s * num_heads + heads) * n_chunks + c, m, mask=g_ok)
            if kt < n:
                tl.debug_barrier()  # the chunk's logits, stored by every thread of the program, read back per head
                _chunk_counts(lg_ptr, ca_ptr, m, g, s, kvh, c, group, t0, t1, num_heads, n_chunks, stride_ls,
                              stride_lh, SCAN_G, RTILE, NB, INV_A)

    @triton.jit
    def _row_top(cm_ptr, s, h, num_heads, n_chunks, nch, NCH: tl.constexpr, INV_A: tl.constexpr):
        """The absolute bucket (float32) of a head's largest logit over its row's first nch chunks."""
        c = tl.arange(0, NCH)
        gmax = tl.max(tl.load(cm_ptr + (s * num_heads + h) * n_chunks + c, mask=c < nch, other=float("-inf")), 0)
        return _abs_bucket(gmax, INV_A)

    @triton.jit
    def _pick_bucket(hist, need, NB: tl.constexpr):
        """Bucket counts [NB] -> (the bucket where the running count reaches need, NB when it does not; the count
        before it; the count in it)."""
        b = tl.arange(0, NB)
        cum = tl.cumsum(hist, 0)
        at = tl.sum((cum < need).to(tl.int32), 0)
        return at, tl.sum(tl.where(b == at - 1, cum, 0), 0), tl.sum(tl.where(b == at, hist, 0), 0)

    @triton.jit
    def _sum_counts(cnt_ptr, cm_ptr, s, h, num_heads, n_chunks, nch, top, NB: tl.constexpr, HL: tl.constexpr,
                    SHIFT: tl.constexpr, INV_A: tl.constexpr):
        """A head's bucket counts [chunks, NB] summed over its row's first nch chunks, HL chunks per load (one round
        trip up to 128k tokens, where a load per chunk waited for each in turn). SHIFT: each chunk's counts start at
        its own maximum's bucket (cm), moved onto the row's (top) on the way."""
        b = tl.arange(0, NB)
        cc = tl.arange(0, HL)
        hist = tl.zeros([NB], dtype=tl.int32)
        base = cnt_ptr + (s * num_heads + h) * n_chunks * NB
        for c0 in range(0, nch, HL):
            c = c0 + cc
            c_ok = c < nch
            if SHIFT:
                ctop = _abs_bucket(tl.load(cm_ptr + (s * num_heads + h) * n_chunks + c, mask=c_ok, other=0.0),
                                      INV_A)
                src = b[None, :] - tl.minimum(ctop - top, NB).to(tl.int32)[:, None]  # (a chunk of -inf: past NB)
                hist += tl.sum(tl.load(base + c[:, None] * NB + src, mask=c_ok[:, None] & (src >= 0), other=0), 0)
            else:
                hist += tl.sum(tl.load(base + c[:, None] * NB + b[None, :], mask=c_ok[:, None], other=0), 0)
        return hist

    @triton.jit
    def _key_buckets(z, top, big_a, NB: tl.constexpr, INV_A: tl.constexpr):
        """First-pass buckets (int32, NB past the window) of keys z below their head's maximum's absolute bucket top,
        and their second-pass buckets inside their own first-pass bucket (as _buckets in PyTorch)."""
        u = -z * INV_A
        a = tl.minimum(tl.floor(u) - top, NB).to(tl.int32)
        b = tl.minimum(tl.maximum((u - (top + big_a.to(tl.float32))) * NB, 0.0), NB - 1).to(tl.int32)
        return a, b

    @triton.jit
    def _kept(z, pos, top, big_a, big_b, cut, NB: tl.constexpr, INV_A: tl.constexpr):
        """Whether each key z at position pos (broadcast against its head's top, A, B and tie cut) is kept: a < A,
        or a == A and b < B, or a == A and b == B and (no cut, or the position's tie hash under the cut); B == NB
        (one counting pass): every key of bucket A as a tie."""
        a, b = _key_buckets(z, top, big_a, NB, INV_A)
        h = ((pos.to(tl.uint32) * tl.full([], 2654435769, tl.uint32)) >> 1).to(tl.int32)  # tie_hash: TIE_MULT, mod 2^32
        one = big_b == NB  # one counting pass: every key of bucket A is a tie
        at_b = (b == big_b) | one
        return (a < big_a) | ((a == big_a) & (((b < big_b) & ~one) | (at_b & ((cut < 0) | (h < cut)))))

    @triton.jit
    def _list_kept(lg_ptr, sel_ptr, kl, s, kvh, group, num_heads, p0, p1, stride_ls, stride_lh, SCAN_G: tl.constexpr,
                   SCAN_T: tl.constexpr, NB: tl.constexpr, INV_A: tl.constexpr, DROP: tl.constexpr):
        """A scan of the stored logits p0..p1-1 of the group's heads (SCAN_T per step) under each head's thresholds
        (sel): the positions some head keeps, compacted into kl[0:count]; returns count. DROP: -inf written over each
        head's logits it does not keep (the estimate's non-candidates)."""
        gs = tl.arange(0, SCAN_G)
        gs_ok = gs < group
        sel_s = sel_ptr + (s * num_heads + kvh * group + gs) * 8
        a_s = tl.load(sel_s, mask=gs_ok, other=-1)
        b_s = tl.load(sel_s + 1, mask=gs_ok, other=-1)
        top_s = tl.load(sel_s + 3, mask=gs_ok, other=0).to(tl.float32, bitcast=True)
        cut_s = tl.load(sel_s + 4, mask=gs_ok, other=-1)
        row_s = lg_ptr + s * stride_ls + (kvh * group + gs)[:, None].to(tl.int64) * stride_lh
        cnt = p0 * 0
        for c0 in range(p0, p1, SCAN_T):
            pos = c0 + tl.arange(0, SCAN_T)
            ok = pos < p1
            live = gs_ok[:, None] & ok[None, :]
            z = tl.load(row_s + pos[None, :], mask=live, other=0.0)
            sel = _kept(z, pos[None, :], top_s[:, None], a_s[:, None], b_s[:, None], cut_s[:, None], NB, INV_A) & live
            if DROP:
                tl.store(row_s + pos[None, :], tl.full([SCAN_G, SCAN_T], float("-inf"), tl.float32),
                         mask=live & ~sel)
            tok = (tl.max(sel.to(tl.int32), 0) > 0) & ok
            ti = tok.to(tl.int32)
            tl.store(kl + cnt + tl.cumsum(ti, 0) - ti, pos, mask=tok)
            cnt += tl.sum(ti, 0)
        return cnt

    @triton.jit(do_not_specialize=["n_cchunks"])
    def _count_kernel(lg_ptr, sel_ptr, cb_ptr, seqlen_ptr, keep_ptr, num_heads, n_cchunks, stride_ls, stride_lh,
                      CCHUNK_T: tl.constexpr, RTILE: tl.constexpr, NB: tl.constexpr, INV_A: tl.constexpr,
                      ATOMIC: tl.constexpr):
        """One (row, query head, counting chunk) of a row whose head needs a second pass: how many of the chunk's keys
        in the first-pass bucket A holding the head's keep-th largest key fall in each second-pass bucket (into cb;
        ATOMIC: each such key adds one to the head's first chunk's counts, which the first threshold launch zeroed:
        few keys fall in A, and a histogram of the chunk costs every key a pass of warp ballots)."""
        s, h, c, n, kt = _program_row(seqlen_ptr, keep_ptr, num_heads, n_cchunks)
        t0 = c * CCHUNK_T
        if (kt > 0) & (kt < n) & (t0 < n):
            out = sel_ptr + (s * num_heads + h) * 8
            big_a = tl.load(out)
            if big_a < NB:
                top = tl.load(out + 3).to(tl.float32, bitcast=True)
                base = lg_ptr + s * stride_ls + h.to(tl.int64) * stride_lh
                hist = tl.zeros([NB], dtype=tl.int32)
                t1 = tl.minimum(t0 + CCHUNK_T, n)
                head = cb_ptr + (s * num_heads + h) * n_cchunks * NB
                for i0 in range(t0, t1, RTILE):
                    i = i0 + tl.arange(0, RTILE)
                    ok = i < t1
                    a, b = _key_buckets(tl.load(base + i, mask=ok, other=0.0), top, big_a, NB, INV_A)
                    in_a = ok & (a == big_a)
                    if ATOMIC:
                        if tl.sum(in_a.to(tl.int32), 0) > RTILE // 16:  # many (ties): one add per bucket, not per key
                            tile = tl.histogram(b, NB, mask=in_a)
                            tl.atomic_add(head + tl.arange(0, NB), tile, mask=tile > 0, sem="relaxed")
                        else:
                            tl.atomic_add(head + b, tl.full([RTILE], 1, tl.int32), mask=in_a, sem="relaxed")
                    else:
                        hist += tl.histogram(b, NB, mask=in_a)
                if not ATOMIC:
                    tl.store(head + c * NB + tl.arange(0, NB), hist)

    @triton.jit(do_not_specialize=["n_chunks", "n_cchunks"])
    def _select_kernel(cm_ptr, ca_ptr, cb_ptr, seqlen_ptr, keep_ptr, sel_ptr, num_heads, n_chunks, n_cchunks,
                       SECOND: tl.constexpr, CHUNK_T: tl.constexpr, CCHUNK_T: tl.constexpr, NB: tl.constexpr,
                       NCH: tl.constexpr, ALL_T: tl.constexpr, HL: tl.constexpr, INV_A: tl.constexpr,
                       ATOMIC: tl.constexpr, TIE_SLACK_T: tl.constexpr, ONE_PASS: tl.constexpr):
        """One (row, query head), after the first counting pass: its first threshold bucket A (the one holding its
        keep-th largest key; ALL_T keeps every key), the count above it and its maximum's absolute bucket into
        sel [rows, Hq, SEL] (A, -, above, top as float32 bits, no tie cut); after the second (SECOND): the second
        threshold B (keep a < A, or a == A and b <= B; -1: nothing of bucket A), how many keys that keeps, and the
        tie cut when bucket B holds more than TIE_SLACK_T keys beyond those needed (tie_cut; the count is then keep)."""
        s, _, h, n, kt = _program_row(seqlen_ptr, keep_ptr, 1, num_heads)
        if kt > 0:
            out = sel_ptr + (s * num_heads + h) * 8
            if SECOND:
                big_a = tl.load(out)
                count = n
                if big_a < NB:
                    above = tl.load(out + 2)
                    nch = tl.cdiv(n, CCHUNK_T)
                    if ATOMIC:
                        nch = 1
                    hist = _sum_counts(cb_ptr, cm_ptr, s, h, num_heads, n_cchunks, nch, 0.0, NB, HL, False, INV_A)
                    big_b, above_b, here_b = _pick_bucket(hist, kt - above, NB)
                    tl.store(out + 1, big_b)
                    need = kt - above - above_b
                    count = above + above_b + here_b
                    if here_b > need + TIE_SLACK_T:  # a flood of ties: about need of them, by position hash
                        tl.store(out + 4, ((need.to(tl.int64) << 31) // here_b).to(tl.int32))
                        count = kt
                elif big_a == NB:  # fewer than keep keys in the window: all of those
                    tl.store(out + 1, big_a * 0 - 1)
                    count = tl.load(out + 2)
                tl.store(out + 2, count)
            else:
                nch = tl.cdiv(n, CHUNK_T)
                top = _row_top(cm_ptr, s, h, num_heads, n_chunks, nch, NCH, INV_A)
                big_a = n * 0 + ALL_T
                above = n * 0
                big_b = big_a * 0
                cut = (big_a * 0 - 1).to(tl.int64)  # no tie cut (the second launch may set one)
                count = n
                if kt < n:
                    hist = _sum_counts(ca_ptr, cm_ptr, s, h, num_heads, n_chunks, nch, top, NB, HL, True, INV_A)
                    big_a, above, here = _pick_bucket(hist, kt, NB)
                    if ONE_PASS:  # no second pass: bucket A sampled down to the keys it needs (B = NB marks it)
                        big_b = tl.where(big_a < NB, NB, -1)
                        count = tl.where(big_a < NB, above + here, above)
                        if (big_a < NB) & (here > kt - above):
                            cut = ((kt - above).to(tl.int64) << 31) // here
                            count = kt
                tl.store(out, big_a)
                tl.store(out + 1, big_b)
                if ONE_PASS:  # the final count (no second launch)
                    tl.store(out + 2, count)
                else:  # the keys above A (the second launch's start)
                    tl.store(out + 2, above)
                tl.store(out + 3, top.to(tl.int32, bitcast=True))
                tl.store(out + 4, cut.to(tl.int32))
                if ATOMIC:  # the second pass's counts, added key by key
                    tl.store(cb_ptr + (s * num_heads + h) * n_cchunks * NB + tl.arange(0, NB), tl.zeros([NB], tl.int32))

    @triton.jit(do_not_specialize=["n_chunks"])
    def _rescore_kernel(q_ptr, k_ptr, bt_ptr, seqlen_ptr, keep_ptr, sel_ptr, kl_ptr, lg_ptr, cm_ptr, ca_ptr,
                        scale_log2, num_heads, num_kv_heads, n_chunks, stride_qs, stride_qh, stride_kpage,
                        stride_kpos, stride_kh, stride_bt, stride_ls, stride_lh, stride_ks, stride_kh2,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_PAD: tl.constexpr, SCAN_G: tl.constexpr,
                        CHUNK_T: tl.constexpr, SCAN_T: tl.constexpr, LIST_T: tl.constexpr, RTILE: tl.constexpr,
                        PAGE_SIZE: tl.constexpr, NB: tl.constexpr, INV_A: tl.constexpr):
        """One chunk of one row after the estimate's thresholds (sel: each head's candidates): a scan of the chunk's
        estimated logits writes -inf for every head's non-candidates and the positions that are some head's
        candidate into a compacted list (kl, at the chunk's offset); then the exact logits of the listed keys (their
        keys read from the cache) replace the estimates of the heads they are candidates of; then each head's
        maximum and first counting pass over the chunk, as the logits launch does for exact logits."""
        s, kvh, c, n, kt = _program_row(seqlen_ptr, keep_ptr, num_kv_heads, n_chunks)
        t0 = c * CHUNK_T
        if (kt > 0) & (t0 < n):
            group = num_heads // num_kv_heads
            t1 = tl.minimum(t0 + CHUNK_T, n)
            kl = kl_ptr + s * stride_ks + kvh.to(tl.int64) * stride_kh2 + t0
            cnt = _list_kept(lg_ptr, sel_ptr, kl, s, kvh, group, num_heads, t0, t1, stride_ls, stride_lh, SCAN_G,
                             SCAN_T, NB, INV_A, True)
            tl.debug_barrier()  # the list and the -inf, visible to every thread of the program
            q, g_ok, d, d_ok = _group_query(q_ptr, s, kvh, group, stride_qs, stride_qh, HEAD_DIM, BLOCK_D, GROUP_PAD)
            q = q.to(k_ptr.dtype.element_ty)
            g = tl.arange(0, GROUP_PAD)
            row = lg_ptr + s * stride_ls + (kvh * group + g)[:, None].to(tl.int64) * stride_lh
            m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
            for j0 in range(0, cnt, LIST_T):
                j = j0 + tl.arange(0, LIST_T)
                jok = j < cnt
                pos = tl.load(kl + j, mask=jok, other=0, cache_modifier=".cg")
                page, slot = paged_coords(bt_ptr, stride_bt, s, pos, jok, PAGE_SIZE)
                off = (page * stride_kpage + (slot.to(tl.int32) * stride_kpos + kvh * stride_kh))[:, None] + d[None, :]
                k = tl.load(k_ptr + off, mask=jok[:, None] & d_ok[None, :], other=0.0)
                live = g_ok[:, None] & jok[None, :]
                est = tl.load(row + pos[None, :], mask=live, other=float("-inf"), cache_modifier=".cg")
                z = tl.where(est > float("-inf"), tl.dot(q, tl.trans(k)) * scale_log2, float("-inf"))
                tl.store(row + pos[None, :], z, mask=live)
                m = tl.maximum(m, tl.max(tl.where(live, z, float("-inf")), 1))
            tl.store(cm_ptr + (s * num_heads + kvh * group + g) * n_chunks + c, m, mask=g_ok)
            if kt < n:
                tl.debug_barrier()  # the chunk's exact logits, read back per head
                _chunk_counts(lg_ptr, ca_ptr, m, g, s, kvh, c, group, t0, t1, num_heads, n_chunks, stride_ls,
                              stride_lh, SCAN_G, RTILE, NB, INV_A)

    @triton.jit
    def _split_range(n, split, num_splits, min_per, TILE_T: tl.constexpr):
        """A split's keys p0..p1-1 of a row of n keys (TILE_T-key tiles spread over num_splits splits, at least
        min_per tiles each), and how many splits hold keys (used)."""
        tiles = tl.cdiv(n, TILE_T)
        per_split = tl.maximum(tl.cdiv(tiles, num_splits), min_per)
        p0 = split * per_split * TILE_T
        return tl.cdiv(tiles, per_split), p0, tl.minimum(p0 + per_split * TILE_T, n)

    @triton.jit
    def _online_step(m_i, l_i, acc, z, sel, v):
        """One step of the online softmax: base-2 logits z [G, T] where sel, values v [T, D] -> (m_i, l_i, acc)."""
        zs = tl.where(sel, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(zs, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(zs - m_safe[:, None])
        return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)

    @triton.jit
    def _finish_split(m_i, l_i, acc, g_ok, heads, d, d_ok, s, kvh, split, used, group, num_heads, num_kv_heads,
                      num_splits, po_ptr, plse_ptr, o_ptr, lse_ptr, sync_ptr, stride_pos, stride_poh, stride_pok,
                      stride_os, stride_oh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_PAD: tl.constexpr,
                      MERGE_G: tl.constexpr, MERGE_SPLITS_T: tl.constexpr):
        """A split's normalized partial and base-2 LSE stored (splits past `used` store none); the last split of
        (row, KV head) to finish merges the group's (ops.decode's merge) and leaves its counter zero."""
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        live = g_ok & (tl.arange(0, GROUP_PAD) * 0 + split < used)
        tl.store(po_ptr + s * stride_pos + heads[:, None] * stride_poh + split * stride_pok + d[None, :], out,
                 mask=live[:, None] & d_ok[None, :])
        tl.store(plse_ptr + (s * num_heads + heads) * num_splits + split, lse, mask=live)
        tl.debug_barrier()
        c = tl.atomic_add(sync_ptr + s * num_kv_heads + kvh, 1, sem="acq_rel")
        if c == num_splits - 1:
            tl.atomic_xchg(sync_ptr + s * num_kv_heads + kvh, 0)
            _merge_group(po_ptr, plse_ptr, o_ptr, lse_ptr, s, kvh, num_heads, group, num_splits, used,
                         stride_pos, stride_poh, stride_pok, stride_os, stride_oh,
                         HEAD_DIM, BLOCK_D, MERGE_G, MERGE_SPLITS_T)

    @triton.jit(do_not_specialize=["num_splits"])
    def _attend_list_kernel(lg_ptr, v_ptr, bt_ptr, seqlen_ptr, keep_ptr, sel_ptr, kl_ptr, po_ptr, plse_ptr, o_ptr,
                            lse_ptr, sync_ptr, num_heads, num_kv_heads, num_splits, min_per,
                            stride_ls, stride_lh, stride_vpage, stride_vpos, stride_vh, stride_bt, stride_ks,
                            stride_kh, stride_pos, stride_poh, stride_pok, stride_os, stride_oh,
                            q_ptr, k_ptr, stride_qs, stride_qh, scale_log2,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_PAD: tl.constexpr,
                            SCAN_G: tl.constexpr, TILE_T: tl.constexpr, SCAN_T: tl.constexpr, LIST_T: tl.constexpr,
                            PAGE_SIZE: tl.constexpr, NB: tl.constexpr, INV_A: tl.constexpr, MERGE_G: tl.constexpr,
                            MERGE_SPLITS_T: tl.constexpr, EXACT_K: tl.constexpr = False):
        """Split `split` of (row, KV head), in two phases: a scan of its logits (SCAN_T per step, SCAN_G heads) writes
        the positions some head of the group keeps into kl (the split's own stretch of it: a compacted list), then
        an online softmax runs over that list, LIST_T keys per step (the stored logits and the values of listed
        keys only; a head's keys the threshold drops masked) -> normalized partial and base-2 LSE; the last split to
        finish merges the group's. Every step of the second phase is full of kept keys, where a step per 64-token
        tile of the context waits for a tile that holds one or two. EXACT_K (the stored logits are a float8 copy's
        estimates): the estimates pick the keys, whose exact logits the softmax takes (their keys read from the cache
        (k_ptr, the value cache's strides), the queries from q_ptr)."""
        s, kvh, split, n, kt = _program_row(seqlen_ptr, keep_ptr, num_kv_heads, num_splits)
        if kt > 0:
            group = num_heads // num_kv_heads
            used, p0, p1 = _split_range(n, split, num_splits, min_per, TILE_T)
            kl = kl_ptr + s * stride_ks + kvh.to(tl.int64) * stride_kh + p0
            # phase 1: the split's kept positions (union over the group's heads) into kl[0:cnt]
            cnt = _list_kept(lg_ptr, sel_ptr, kl, s, kvh, group, num_heads, p0, p1, stride_ls, stride_lh, SCAN_G,
                             SCAN_T, NB, INV_A, False)
            tl.debug_barrier()  # the list's stores, visible to every thread of the program
            # phase 2: online softmax over the listed keys
            g = tl.arange(0, GROUP_PAD)
            g_ok = g < group
            heads = kvh * group + g
            d = tl.arange(0, BLOCK_D)
            d_ok = d < HEAD_DIM
            sel_row = sel_ptr + (s * num_heads + heads) * 8
            big_a = tl.load(sel_row, mask=g_ok, other=-1)  # a padded head keeps nothing
            big_b = tl.load(sel_row + 1, mask=g_ok, other=-1)
            top = tl.load(sel_row + 3, mask=g_ok, other=0).to(tl.float32, bitcast=True)
            cut = tl.load(sel_row + 4, mask=g_ok, other=-1)
            row = lg_ptr + s * stride_ls + heads[:, None].to(tl.int64) * stride_lh
            m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
            acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
            if EXACT_K:
                q = _group_query(q_ptr, s, kvh, group, stride_qs, stride_qh, HEAD_DIM, BLOCK_D,
                                 GROUP_PAD)[0].to(k_ptr.dtype.element_ty)
            for j0 in range(0, cnt, LIST_T):
                j = j0 + tl.arange(0, LIST_T)
                jok = j < cnt
                pos = tl.load(kl + j, mask=jok, other=0, cache_modifier=".cg")
                z = tl.load(row + pos[None, :], mask=g_ok[:, None] & jok[None, :], other=0.0)
                page, slot = paged_coords(bt_ptr, stride_bt, s, pos, jok, PAGE_SIZE)
                off = (page * stride_vpage + (slot.to(tl.int32) * stride_vpos + kvh * stride_vh))[:, None] + d[None, :]
                v = tl.load(v_ptr + off, mask=jok[:, None] & d_ok[None, :], other=0.0)
                sel = _kept(z, pos[None, :], top[:, None], big_a[:, None], big_b[:, None], cut[:, None], NB,
                            INV_A) & jok[None, :] & g_ok[:, None]
                if EXACT_K:
                    k = tl.load(k_ptr + off, mask=jok[:, None] & d_ok[None, :], other=0.0)
                    z = tl.dot(q, tl.trans(k)) * scale_log2
                m_i, l_i, acc = _online_step(m_i, l_i, acc, z, sel, v)
            _finish_split(m_i, l_i, acc, g_ok, heads, d, d_ok, s, kvh, split, used, group, num_heads, num_kv_heads,
                          num_splits, po_ptr, plse_ptr, o_ptr, lse_ptr, sync_ptr, stride_pos, stride_poh, stride_pok,
                          stride_os, stride_oh, HEAD_DIM, BLOCK_D, GROUP_PAD, MERGE_G, MERGE_SPLITS_T)

    @triton.jit
    def _sample_stride(kt, SQ: tl.constexpr, SMAX: tl.constexpr):
        """sample_stride in Triton: a row's sampling stride, kt // SQ within 1..SMAX."""
        return tl.minimum(tl.maximum(kt // SQ, 1), SMAX)

    @triton.jit
    def _sample_kernel(q_ptr, k_ptr, bt_ptr, seqlen_ptr, keep_ptr, lg_ptr, scale_log2, num_heads, num_kv_heads,
                       programs, stride_qs, stride_qh, stride_kpage, stride_kpos, stride_kh, stride_bt, stride_ls,
                       stride_lh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_PAD: tl.constexpr,
                       TILE_T: tl.constexpr, PAGE_SIZE: tl.constexpr, SMAX: tl.constexpr, SQ: tl.constexpr):
        """PASSES 0, launch 1: program p of (row, KV head) of `programs`: the group's exact base-2 logits of keys 0,
        st, 2 st, ... (st = clamp(keep // SQ, 1, SMAX), m = ceil(n / st) of them), TILE_T per step, steps p,
        p + programs, ... -> lg[s, head, j] for sampled key j. Rows that keep every key (or none) skip."""
        s, kvh, p, n, kt = _program_row(seqlen_ptr, keep_ptr, num_kv_heads, programs)
        if (kt > 0) & (kt < n):
            group = num_heads // num_kv_heads
            q, g_ok, d, d_ok = _group_query(q_ptr, s, kvh, group, stride_qs, stride_qh, HEAD_DIM, BLOCK_D, GROUP_PAD)
            q = q.to(k_ptr.dtype.element_ty)
            st = _sample_stride(kt, SQ, SMAX)
            m = tl.cdiv(n, st)
            heads = kvh * group + tl.arange(0, GROUP_PAD)
            row = lg_ptr + s * stride_ls + heads[:, None].to(tl.int64) * stride_lh
            for j0 in range(p * TILE_T, m, programs * TILE_T):
                j = j0 + tl.arange(0, TILE_T)
                ok = j < m
                page, slot = paged_coords(bt_ptr, stride_bt, s, j * st, ok, PAGE_SIZE)
                k = tl.load(k_ptr + (page * stride_kpage + slot * stride_kpos + kvh * stride_kh)[:, None] + d[None, :],
                            mask=ok[:, None] & d_ok[None, :], other=0.0)
                z = tl.dot(q, tl.trans(k)) * scale_log2
                tl.store(row + j[None, :], z, mask=g_ok[:, None] & ok[None, :])

    @triton.jit
    def _sample_select_kernel(lg_ptr, seqlen_ptr, keep_ptr, sel_ptr, num_heads, stride_ls, stride_lh,
                              SMAX: tl.constexpr, SQ: tl.constexpr, MT: tl.constexpr, ITERS: tl.constexpr,
                              RANGE: tl.constexpr):
        """PASSES 0, launch 2: one program per (row, query head): its threshold from the sampled logits (the
        sampled_threshold twin's bisection over the first MT held in registers, any beyond read again from L1/L2 at
        each step) -> sel[s, h, 5] (float32 bits; -inf for a row that keeps every key), and sel[s, h, 2] zeroed (the
        attention adds its kept keys)."""
        s, h, _, n, kt = _program_row(seqlen_ptr, keep_ptr, num_heads, 1)
        if kt > 0:
            st = _sample_stride(kt, SQ, SMAX)
            m = tl.where(kt < n, tl.cdiv(n, st), 0)
            k = tl.minimum(tl.maximum((kt + st // 2) // st, 1), m)
            row = lg_ptr + s * stride_ls + h.to(tl.int64) * stride_lh
            jj = tl.arange(0, MT)
            z0 = tl.load(row + jj, mask=jj < m, other=float("-inf"))  # the first MT stay in registers
            top = tl.max(z0, 0)
            for j0 in range(MT, m, MT):
                top = tl.maximum(top, tl.max(tl.load(row + j0 + jj, mask=j0 + jj < m, other=float("-inf")), 0))
            lo = top - RANGE
            hi = top
            for _ in range(ITERS):
                mid = (lo + hi) * 0.5
                cnt = tl.sum((z0 >= mid).to(tl.int32), 0)
                for j0 in range(MT, m, MT):
                    z = tl.load(row + j0 + jj, mask=j0 + jj < m, other=float("-inf"))
                    cnt += tl.sum((z >= mid).to(tl.int32), 0)
                big = cnt >= k
                lo = tl.where(big, mid, lo)
                hi = tl.where(big, hi, mid)
            thr = tl.where(kt < n, lo, float("-inf"))
            out = sel_ptr + (s * num_heads + h) * 8
            tl.store(out + 5, thr.to(tl.int32, bitcast=True))
            tl.store(out + 2, 0)

    @triton.jit(do_not_specialize=["num_splits"])
    def _fused_attend_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, seqlen_ptr, keep_ptr, sel_ptr, po_ptr, plse_ptr, o_ptr,
                             lse_ptr, sync_ptr, scale_log2, num_heads, num_kv_heads, num_splits, min_per,
                             stride_qs, stride_qh, stride_kpage, stride_kpos, stride_kh, stride_vpage, stride_vpos,
                             stride_vh, stride_bt, stride_pos, stride_poh, stride_pok, stride_os, stride_oh,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_PAD: tl.constexpr,
                             TILE_T: tl.constexpr, PAGE_SIZE: tl.constexpr, MERGE_G: tl.constexpr,
                             MERGE_SPLITS_T: tl.constexpr):
        """PASSES 0, launch 3: split `split` of (row, KV head): every key's exact base-2 logit, TILE_T keys per step,
        and in the same step the online softmax of each head over its keys at or above its threshold (sel[s, h, 5])
        (the values of the keys some head of the group keeps: the others' loads are masked off) -> normalized
        partial and base-2 LSE, each head's kept keys added to sel[s, h, 2]; the last split to finish merges the
        group's (ops.decode's merge)."""
        s, kvh, split, n, kt = _program_row(seqlen_ptr, keep_ptr, num_kv_heads, num_splits)
        if kt > 0:
            group = num_heads // num_kv_heads
            used, p0, p1 = _split_range(n, split, num_splits, min_per, TILE_T)
            q, g_ok, d, d_ok = _group_query(q_ptr, s, kvh, group, stride_qs, stride_qh, HEAD_DIM, BLOCK_D, GROUP_PAD)
            q = q.to(k_ptr.dtype.element_ty)
            heads = kvh * group + tl.arange(0, GROUP_PAD)
            sel_row = sel_ptr + (s * num_heads + heads) * 8
            thr = tl.load(sel_row + 5, mask=g_ok, other=0x7F800000).to(tl.float32, bitcast=True)  # padded: +inf
            m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
            kept = tl.zeros([GROUP_PAD], dtype=tl.int32)
            acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
            for t in range(p0, p1, TILE_T):
                pos = t + tl.arange(0, TILE_T)
                ok = pos < p1
                page, slot = paged_coords(bt_ptr, stride_bt, s, pos, ok, PAGE_SIZE)
                k = tl.load(k_ptr + (page * stride_kpage + slot * stride_kpos + kvh * stride_kh)[:, None] + d[None, :],
                            mask=ok[:, None] & d_ok[None, :], other=0.0)
                z = tl.dot(q, tl.trans(k)) * scale_log2
                sel = (z >= thr[:, None]) & ok[None, :]
                some = tl.max(sel.to(tl.int32), 0) > 0  # keys some head of the group keeps: their values only
                v = tl.load(v_ptr + (page * stride_vpage + slot * stride_vpos + kvh * stride_vh)[:, None] + d[None, :],
                            mask=some[:, None] & d_ok[None, :], other=0.0)
                m_i, l_i, acc = _online_step(m_i, l_i, acc, z, sel, v)
                kept += tl.sum(sel.to(tl.int32), 1)
            tl.atomic_add(sel_row + 2, kept, mask=g_ok & (kept > 0))
            _finish_split(m_i, l_i, acc, g_ok, heads, d, d_ok, s, kvh, split, used, group, num_heads, num_kv_heads,
                          num_splits, po_ptr, plse_ptr, o_ptr, lse_ptr, sync_ptr, stride_pos, stride_poh, stride_pok,
                          stride_os, stride_oh, HEAD_DIM, BLOCK_D, GROUP_PAD, MERGE_G, MERGE_SPLITS_T)


def token_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, keep: torch.Tensor, scale: float, out: torch.Tensor,
                 scratch: TokenScratch | None = None, counts: torch.Tensor | None = None,
                 impl: str = "auto", stages: int = 3, codes: KeyCodes | None = None,
                 rerank: int = RERANK, passes: int | None = None) -> torch.Tensor:
    """Decode attention of one new token per row (at position seq_lens[s] - 1) over each query head's own
    ``keep[s]`` highest-scoring keys (kept_keys' rule: ties with the keep-th within the threshold's bucket kept too;
    every key when keep[s] >= seq_lens[s]); rows with keep[s] <= 0 are not written.

    q [S, Hq, D]; key_cache, value_cache [num_pages, page_size, Hkv, D] (any strides, contiguous head dim);
    block_table [S, max_pages] int32; seq_lens [S] int32; keep [S] int32 (on the device: a CUDA graph replays it);
    out [S, Hq, D] (written in place, returned). scratch: a TokenScratch whose logits hold the longest context (on a
    GPU not checked: the engine sizes it for max_model_len; fixed addresses for CUDA graphs; made here when None,
    from one host read of seq_lens); rows beyond its row
    count run in further groups of launches. counts [S, Hq] int32: filled with the keys each head kept. stages: the
    launches run, for profiling (1: the logits, 2: and the counts and thresholds; 3: all, the only value that writes
    out). codes: a copy of the key cache (ops.key_codes, current for every key of the rows): every key is scored
    with it; with an "int4" copy each head's rerank x keep[s] best by that estimate (the same rule) are its
    candidates, and the rule runs again on the candidates' exact scores (the only keys read from the key cache);
    with an "fp8" copy each head's keep[s] best by the estimate are attended by exact score (rerank unused; the key
    and value caches must share strides, views of one KV cache). passes: kept_keys'
    counting passes, 1 or 2, or 0 for a sampled threshold (sampled_rule; no codes) (PASSES when None)."""
    hq, hkv, d = _check(q, key_cache, value_cache, block_table, seq_lens, keep, out, codes, rerank, passes)
    passes = PASSES if passes is None else passes
    check(stages in (1, 2, 3), f"stages={stages!r} must be 1, 2 or 3")
    ns = q.shape[0]
    if resolve_impl(impl, q, key_cache) == "torch":
        return token_decode_torch(q, key_cache, value_cache, block_table, seq_lens, keep, scale, out, counts, codes,
                                  rerank, passes)
    if ns == 0:
        return out
    if scratch is None:
        max_len = int(seq_lens[:ns].max())
        scratch = token_scratch(scratch_rows(hq, max_len, ns), hq, hkv, d, max_len, q.device, passes)
    npad = scratch.logits.shape[-1]
    n_chunks, n_cchunks = triton.cdiv(npad, CHUNK), triton.cdiv(npad, COUNT_CHUNK)
    check(scratch.logits.shape[1] == hq and scratch.part_o.numel() == scratch.part_lse.numel() * d
          and scratch.sync.numel() >= scratch.rows * hkv and tuple(scratch.cmax.shape[1:]) == (hq, n_chunks)
          and tuple(scratch.count_a.shape[1:]) == (hq, n_chunks, BUCKETS)
          and tuple(scratch.kept.shape) == (scratch.rows, hkv, npad) and scratch.cand.shape == (scratch.rows,),
          "token decode scratch does not match (heads, head dim, KV heads)")
    if q.device.type == "cpu":  # (on a GPU this would be a host sync, and a CUDA graph cannot hold one)
        check(int(seq_lens[:ns].max()) <= npad, f"a row of {int(seq_lens[:ns].max())} tokens does not fit the "
                                                f"scratch's logits ({npad} tokens)")
    block_d = max(16, next_pow2(d))
    gpad = max(16, next_pow2(hq // hkv))
    page = key_cache.shape[1]
    steps = dict(NB=BUCKETS, INV_A=1.0 / STEP_A)
    sg = next_pow2(hq // hkv)
    lg, cmax, ca, cb, sel, kl = (scratch.logits, scratch.cmax, scratch.count_a, scratch.count_b, scratch.sel,
                                 scratch.kept)
    cc, cs = (codes.codes, codes.bounds) if codes is not None else (key_cache, key_cache)  # (unread without codes)
    fp8 = codes is not None and codes.fmt == "fp8"
    if fp8:
        cc = cc.view(torch.float8_e4m3fn)  # (the codes load as e4m3 values)
        # (the attention reads the kept keys through the value cache's strides)
        check(key_cache.stride() == value_cache.stride(), "an fp8 key copy's decode needs the key and value caches to "
                                                          "share strides (views of one KV cache)")
    cstr = (cc.stride(0), cc.stride(1), cc.stride(2), cs.stride(0), cs.stride(1), cs.stride(2)) \
        if codes is not None else (0,) * 6
    maxnreg = FP8_MAXNREG if fp8 else LOGITS_MAXNREG

    def report(r0, r, kp):  # each head's kept keys (sel slot 2) into counts, for the rows whose decode ran
        if counts is not None:
            counts[r0:r0 + r] = torch.where((kp > 0)[:, None], sel[:r, :, 2], counts[r0:r0 + r])

    for r0 in range(0, ns, scratch.rows):
        r = min(scratch.rows, ns - r0)
        qs, bt, sl, kp, os_ = q[r0:r0 + r], block_table[r0:r0 + r], seq_lens[r0:r0 + r], keep[r0:r0 + r], out[r0:r0 + r]
        if passes == 0:
            _sampled_launches(qs, key_cache, value_cache, bt, sl, kp, scale, os_, scratch, r, hq, hkv, d, stages)
            if stages == 3:
                report(r0, r, kp)
            continue
        first = kp
        if codes is not None and not fp8:
            first = torch.mul(kp, rerank, out=scratch.cand[:r])
        _logits_kernel[(r * hkv * n_chunks,)](
            qs, key_cache, cc, cs, bt, sl, first, lg, cmax, ca, scale * LOG2E, hq, hkv, n_chunks,
            qs.stride(0), qs.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), *cstr,
            bt.stride(0), lg.stride(0), lg.stride(1), HEAD_DIM=d, BLOCK_D=block_d, GROUP_PAD=gpad, SCAN_G=sg,
            CHUNK_T=CHUNK, TILE_T=min(FP8_TILE if fp8 else LOGITS_TILE, CHUNK), RTILE=min(CHUNK, COUNT_TILE),
            PAGE_SIZE=page, **steps, CODES=codes is not None, CGROUP=CODE_GROUP, BLOCK_H=max(16, next_pow2(d // 2)),
            EST_DT=tl.float32 if key_cache.dtype == torch.float32 else tl.float16,
            CODE_ASM_T=CODE_ASM and q.device.type == "cuda", FP8=fp8, FMAX=FP8_MAX, num_warps=LOGITS_WARPS,
            num_stages=FP8_STAGES if fp8 else LOGITS_STAGES, **({"maxnreg": maxnreg} if maxnreg else {}))
        if stages == 1:
            continue
        select = dict(CHUNK_T=CHUNK, CCHUNK_T=COUNT_CHUNK, NCH=next_pow2(n_chunks), ALL_T=ALL, HL=HIST_LOAD, **steps,
                      ATOMIC=COUNT_ATOMIC, TIE_SLACK_T=TIE_SLACK, ONE_PASS=passes == 1, num_warps=4)

        def thresholds(budget):
            _select_kernel[(r * hq,)](cmax, ca, cb, sl, budget, sel, hq, n_chunks, n_cchunks, SECOND=False, **select)
            if passes == 1:
                return
            _count_kernel[(r * hq * n_cchunks,)](lg, sel, cb, sl, budget, hq, n_cchunks, lg.stride(0), lg.stride(1),
                                                 CCHUNK_T=COUNT_CHUNK, RTILE=COUNT_TILE, **steps, ATOMIC=COUNT_ATOMIC,
                                                 num_warps=4)
            _select_kernel[(r * hq,)](cmax, ca, cb, sl, budget, sel, hq, n_chunks, n_cchunks, SECOND=True, **select)

        thresholds(first)
        if codes is not None and not fp8:
            _rescore_kernel[(r * hkv * n_chunks,)](
                qs, key_cache, bt, sl, kp, sel, kl, lg, cmax, ca, scale * LOG2E, hq, hkv, n_chunks, qs.stride(0),
                qs.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), bt.stride(0),
                lg.stride(0), lg.stride(1), kl.stride(0), kl.stride(1), HEAD_DIM=d, BLOCK_D=block_d, GROUP_PAD=gpad,
                SCAN_G=sg, CHUNK_T=CHUNK, SCAN_T=min(SCAN_TILE, CHUNK), LIST_T=ATTEND_TILE,
                RTILE=min(CHUNK, COUNT_TILE), PAGE_SIZE=page, **steps, num_warps=LOGITS_WARPS)
            thresholds(kp)
        if stages == 2:
            continue
        splits = num_splits(r, hkv, npad)
        po, plse = scratch.partials(r, splits)
        _attend_list_kernel[(r * hkv * splits,)](
            lg, value_cache, bt, sl, kp, sel, kl, po, plse, os_, scratch.lse, scratch.sync, hq, hkv, splits,
            MIN_TILES_PER_SPLIT, lg.stride(0), lg.stride(1), value_cache.stride(0), value_cache.stride(1),
            value_cache.stride(2), bt.stride(0), kl.stride(0), kl.stride(1), po.stride(0), po.stride(1),
            po.stride(2), os_.stride(0), os_.stride(1), qs, key_cache, qs.stride(0), qs.stride(1), scale * LOG2E,
            HEAD_DIM=d, BLOCK_D=block_d, GROUP_PAD=gpad, SCAN_G=sg, TILE_T=TILE, SCAN_T=SCAN_TILE, LIST_T=ATTEND_TILE,
            PAGE_SIZE=page, MERGE_G=sg, MERGE_SPLITS_T=merge_tile(MERGE_SPLITS, hq // hkv, splits), EXACT_K=fp8,
            **steps, num_warps=ATTEND_WARPS, **({"maxnreg": ATTEND_MAXNREG} if ATTEND_MAXNREG else {}))
        report(r0, r, kp)
    return out


def _sampled_launches(q, key_cache, value_cache, bt, sl, kp, scale, out, scratch, r, hq, hkv, d, stages):
    """PASSES 0 for r rows: the sample (launch 1), the thresholds (2), the one-pass attention and merge (3); stages
    as token_decode's. The sampled logits go to scratch.logits (their first ceil(n / stride) columns), the
    thresholds and kept counts to scratch.sel, the partials to scratch.partials."""
    npad = scratch.logits.shape[-1]
    lg, sel = scratch.logits, scratch.sel
    block_d, gpad, page = max(16, next_pow2(d)), max(16, next_pow2(hq // hkv)), key_cache.shape[1]
    # programs per (row, KV head): one step each at stride SAMPLE
    sp = triton.cdiv(triton.cdiv(npad, SAMPLE), SAMPLE_TILE)
    _sample_kernel[(r * hkv * sp,)](
        q, key_cache, bt, sl, kp, lg, scale * LOG2E, hq, hkv, sp, q.stride(0), q.stride(1), key_cache.stride(0),
        key_cache.stride(1), key_cache.stride(2), bt.stride(0), lg.stride(0), lg.stride(1), HEAD_DIM=d,
        BLOCK_D=block_d, GROUP_PAD=gpad, TILE_T=SAMPLE_TILE, PAGE_SIZE=page, SMAX=SAMPLE, SQ=SAMPLE_Q, num_warps=4)
    if stages == 1:
        return
    _sample_select_kernel[(r * hq,)](lg, sl, kp, sel, hq, lg.stride(0), lg.stride(1), SMAX=SAMPLE, SQ=SAMPLE_Q,
                                     MT=SAMPLE_SEL_TILE, ITERS=SAMPLE_ITERS, RANGE=SAMPLE_RANGE, num_warps=8)
    if stages == 2:
        return
    splits = fused_splits(r, hkv, npad)
    check(scratch.part_lse.numel() >= r * hq * splits, "token decode scratch holds the counting rule's split "
                                                       "partials only: make it with token_scratch(..., passes=0)")
    po, plse = scratch.partials(r, splits)
    _fused_attend_kernel[(r * hkv * splits,)](
        q, key_cache, value_cache, bt, sl, kp, sel, po, plse, out, scratch.lse, scratch.sync, scale * LOG2E, hq, hkv,
        splits, FUSED_MIN_TILES, q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1),
        key_cache.stride(2), value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), bt.stride(0),
        po.stride(0), po.stride(1), po.stride(2), out.stride(0), out.stride(1), HEAD_DIM=d, BLOCK_D=block_d,
        GROUP_PAD=gpad, TILE_T=FUSED_TILE, PAGE_SIZE=page, MERGE_G=next_pow2(hq // hkv),
        MERGE_SPLITS_T=merge_tile(MERGE_SPLITS, hq // hkv, splits), num_warps=FUSED_WARPS, num_stages=FUSED_STAGES,
        **({"maxnreg": FUSED_MAXNREG} if FUSED_MAXNREG else {}))
