"""FusedAttention: one GPU kernel for ``softmax(Q K^T [* s] [+ mask]) V``.

``FusePlan`` puts a whole attention -- the scores matmul, the element-wise ops on the scores
(scale, mask, bias), the softmax and the matmul with ``V`` -- into one fused function when
:func:`attention_fits` says this rule can schedule it (see ``transform.fuse``).  After
``FuseTIR`` and ``InlineDataMovement`` that function is a chain of blocks::

    S[b.., i, j]  += Q[b.., i, d] * K[b.., j, d]      (head split folded into the reads)
    (element-wise on S)                               -> inlined into their readers
    M[b.., i]      = max_j S'[b.., i, j]
    (exp)                                             -> inlined into its readers
    Z[b.., i]     += exp(S'[b.., i, j] - M)
    P[b.., i, j]   = exp(S' - M) / Z
    O[b.., i, e]  += P[b.., i, j] * V[b.., j, e]      (+ epilogue, e.g. the head merge)

The rule gives each thread block ``rows`` query rows of one (batch, head): a ``rows x 32``
thread block keeps the rows' scores and probabilities in shared memory, the two row statistics
are warp reductions, and each thread accumulates ``ceil(D / 32)`` outputs in registers.  Where
the head is a multiple of 32 wide and a tile fits, ``K`` and ``V`` go through shared memory 32
keys at a time, copied coalesced by the whole block, and each lane owns ``D / 32`` consecutive
outputs so one probability read feeds all of them (read from global memory in the PV loop, as
before, every row of the block -- one warp each -- fetched all of ``V`` again).  The
score matrix never reaches global memory and three launches become one -- what SmartMem and
DNNFusion count as one fused kernel, scheduled here without tensor cores (the sequences of the
models we target are short: 50-200 tokens a head).

A row may instead get two warps (``lanes = 64``, ``TVM_SMARTMEM_ATTENTION_LANES`` or
``FusedAttention(lanes=64)``): twice the resident warps for the same rows (DeiT-S's 1182 rows
are ~9 warps a multiprocessor on the H100 with one warp each -- too few to hide the shared-
memory and L1 latencies of a kernel without register tiling), K and V tiles of 64 keys, each
lane one output of a 64-wide head, and the row statistics reduced across the two warps by
TVM's multi-warp all-reduce (shuffles, then one exchange through shared memory).  It applies
where each lane then owns whole outputs of the staged V loop (head a multiple of 64, tiles in
a 48 KiB budget); elsewhere the rule keeps one warp.

Anything that does not have exactly this shape is declined (``None``), and the buffer rules
that follow in the list take it.  Q, K and V may be images (texels read one value at a time);
when the output is an image (texture activations), each lane accumulates whole texels -- four
consecutive outputs of one row -- and writes them as one RGBA store.
"""

from __future__ import annotations

import dataclasses

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl

from .. import switches
from ..errors import SmartMemError
from .texture import LANES as TEXEL  # values per texel (RGBA); LANES here is a warp's
from .texture import is_texture

#: Threads along a row by default (one warp: the row statistics are warp reductions).
LANES = 32
#: Threads along a row that the rule can use: one warp, or two (the row statistics then
#: reduce across the two warps through shared memory, TVM's multi-warp all-reduce).
LANE_CHOICES = (32, 64)
#: Overrides the threads along a row (an integer of ``LANE_CHOICES``), to build and measure.
LANES_ENV = "TVM_SMARTMEM_ATTENTION_LANES"
#: Shared memory the scores and probabilities of one thread block may take, at most (less
#: where the target allows less: PoCL's OpenCL target has 16 KiB).
SHARED_BYTES = 32 * 1024
#: Longest key sequence and widest head the rule takes.
MAX_KEYS = 2048
MAX_HEAD_DIM = 256
#: Inner loops of at most this many steps are unrolled (the PV key tile, the head dimension).
UNROLL = 256


#: Longest key sequence for which FusePlan makes the attention one kernel, per target kind.
#: Measured on the H100: with 49 keys (Swin), 128 (BERT, DistilBERT, GPT-2) and LLaMA's
#: prefill the fused kernel beat the GEMM + softmax + GEMM kernels by 2-4% end to end
#: (``benchmarks/results/gpu_attention_h100_df3f5b8.md``); at 197 keys (DeiT-S, ViT-B) the
#: kernel with V staged through shared memory is 3.2% faster than the split attention on CUDA
#: (``gpu_h100_pending_4a365a0.md``: 1.296 against 1.337 ms for DeiT-S), so CUDA fuses up to
#: 256 keys.  Other targets keep the earlier limit until measured there.
PROFITABLE_KEYS = {"cuda": 256}
#: The limit of a target kind without a measurement of its own (and of no target).
DEFAULT_PROFITABLE_KEYS = 160


#: Overrides ``PROFITABLE_KEYS`` (an integer), to build and measure other choices.
KEYS_ENV = "TVM_SMARTMEM_ATTENTION_KEYS"


def profitable_keys(target=None) -> int:
    """Longest key sequence fused into one kernel on ``target`` (``TVM_SMARTMEM_ATTENTION_KEYS``
    when set)."""
    kind = target.kind.name if target is not None else None
    measured = PROFITABLE_KEYS.get(kind, DEFAULT_PROFITABLE_KEYS)
    return switches.integer(KEYS_ENV, measured, expected="an integer number of keys")


def attention_pays(keys: int, target=None) -> bool:
    """Is one fused kernel measured to be faster than three for ``keys`` keys on ``target``?"""
    return keys <= profitable_keys(target)


def shared_budget(target=None, lanes: int = LANES) -> int:
    """Bytes of shared memory a thread block of the rule may use on ``target``: 32 KiB with
    one warp a row, 48 KiB with two (their K and V tiles are twice as long), never more than
    the target has."""
    budget = SHARED_BYTES if lanes <= LANES else SHARED_BYTES * 3 // 2
    if target is None or "max_shared_memory_per_block" not in target.attrs:
        return budget
    return min(budget, int(target.attrs["max_shared_memory_per_block"]))


def lanes_for() -> int:
    """Threads along a query row: ``TVM_SMARTMEM_ATTENTION_LANES`` when set, else one warp."""
    return switches.integer(LANES_ENV, LANES, LANE_CHOICES,
                            f"one of {', '.join(map(str, LANE_CHOICES))} threads a row")


def rows_per_block(keys: int, itemsize: int = 4, max_threads: int = 1024,
                   shared: int = SHARED_BYTES, lanes: int = LANES) -> int:
    """Query rows per thread block: as many as ``shared`` bytes hold (two ``rows x keys``
    buffers), at most 8, a power of two, ``rows x lanes`` threads at most ``max_threads``."""
    rows = 8
    while rows > 1 and (2 * rows * keys * itemsize > shared or rows * lanes > max_threads):
        rows //= 2
    return rows


def attention_fits(keys: int, head_dim: int, itemsize: int = 4,
                   shared: int = SHARED_BYTES) -> bool:
    """Can :class:`FusedAttention` schedule an attention with these static sizes (one row of
    scores and probabilities per block must fit in ``shared`` bytes)?"""
    return 0 < keys <= MAX_KEYS and 0 < head_dim <= MAX_HEAD_DIM and \
        2 * keys * itemsize <= shared


@dataclasses.dataclass
class _Blocks:
    scores: object  # the QK^T reduction
    stats: list  # row reductions (max, sum)
    probs: object  # the spatial block the PV reduction reads
    out: object  # the PV reduction


def _kinds(sch: s_tir.Schedule, block) -> str:
    return "".join("S" if iv.iter_type == tirx.IterVar.DataPar else
                   "R" if iv.iter_type == tirx.IterVar.CommReduce else "O"
                   for iv in sch.get(block).iter_vars)


def _written(sch: s_tir.Schedule, block) -> set:
    return {w.source for w in sch.get(block).writes}


def _read(sch: s_tir.Schedule, block) -> set:
    return {r.source for r in sch.get(block).reads}


def _inline_around(sch: s_tir.Schedule) -> _Blocks | None:
    """Inline every spatial block but the probabilities, reverse-inline the epilogue; return
    the remaining blocks when they have the attention shape."""
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    kinds = [_kinds(sch, b) for b in blocks]
    reductions = [k for k, kind in enumerate(kinds) if "R" in kind]
    if len(reductions) != 4 or any("O" in kind for kind in kinds):
        return None
    first, last = reductions[0], reductions[-1]
    # the probabilities: the spatial block(s) between the statistics and PV that PV reads
    pv_reads = _read(sch, blocks[last])
    probs = [k for k in range(reductions[2] + 1, last)
             if _written(sch, blocks[k]) & pv_reads]
    if len(probs) != 1:
        return None
    keep = set(reductions) | set(probs)
    names = [sch.get(b).name_hint for b in blocks]
    # prologue and score element-wise blocks: inline (last first, so readers stay blocks)
    for k in reversed(range(last)):
        if k in keep:
            continue
        sch.compute_inline(sch.get_sblock(names[k]))
    # epilogue after PV: stays a separate block; written from registers later
    epilogue = [names[k] for k in range(last + 1, len(blocks))]
    return _Blocks(sch.get_sblock(names[first]),
                   [sch.get_sblock(names[k]) for k in reductions[1:3]],
                   sch.get_sblock(names[probs[0]]), sch.get_sblock(names[last])) \
        if _shapes_ok(sch, names, reductions, probs[0], epilogue) else None


def _shapes_ok(sch, names, reductions, probs, epilogue) -> bool:
    s, m, z, o = (sch.get(sch.get_sblock(names[k])) for k in reductions)
    p = sch.get(sch.get_sblock(names[probs]))
    n = len(s.iter_vars) - 1  # batch.. + i + j spatial, d reduced
    if n < 2 or [iv.iter_type for iv in s.iter_vars][-1] != tirx.IterVar.CommReduce:
        return False
    if any(len(b.iter_vars) != n for b in (m, z)) or len(p.iter_vars) != n or \
            len(o.iter_vars) != n + 1:
        return False
    for b in (s, m, z, p, o):
        if any(not isinstance(iv.dom.extent, tirx.IntImm) for iv in b.iter_vars):
            return False
    # the rows reduced by the statistics are the score rows, PV reduces over the keys
    keys = int(s.iter_vars[n - 1].dom.extent)
    return int(m.iter_vars[-1].dom.extent) == keys and int(z.iter_vars[-1].dom.extent) == keys \
        and int(o.iter_vars[-1].dom.extent) == keys


class FusedAttention(dl.ScheduleRule):
    """Schedule a fused attention kernel (see module doc); decline anything else."""

    #: a head dimension of one is still the scores' reduction here (its own blocks, no dlight
    #: inlining): ``ApplyScheduleRules`` hands this rule the kernel as FuseTIR made it
    keeps_unit_reductions = True

    def __init__(self, stage_values: bool = True, lanes: int | None = None):
        #: stage V through shared memory 32 keys at a time where a tile fits (``False``: read
        #: V from global memory in the PV loop, the kernel before that change, for comparison)
        self.stage_values = stage_values
        #: threads along a query row (``None``: :func:`lanes_for`, one warp unless overridden)
        if lanes is not None and lanes not in LANE_CHOICES:
            raise SmartMemError(f"FusedAttention(lanes={lanes}): expected one of "
                                f"{LANE_CHOICES}")
        self.lanes = lanes

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name not in ("cuda", "opencl"):
            return None
        sch = s_tir.Schedule(func)
        found = _inline_around(sch)
        if found is None:
            return None
        out = sch.get(found.out)
        keys = int(out.iter_vars[-1].dom.extent)
        head_dim = int(out.iter_vars[-2].dom.extent)
        itemsize = max(out.writes[0].source.dtype.bits // 8, 1)
        texels = _writes_image(func)
        if texels and head_dim % TEXEL:
            return None
        # two warps a row only where each lane then owns whole outputs of the staged-V loop
        # (the texel path keeps one warp: its lanes split a head into texels)
        lanes = self.lanes or lanes_for()
        if texels or head_dim % lanes:
            lanes = LANES
        shared = shared_budget(target, lanes)
        if not attention_fits(keys, head_dim, itemsize, shared):
            return None
        threads = int(target.attrs.get("max_num_threads", 1024))
        if lanes > threads:
            return None
        key_reads = _key_reads(sch, found.scores)
        depth = int(sch.get(found.scores).iter_vars[-1].dom.extent)
        tiles = len(key_reads) * lanes * (depth + 1) * itemsize
        cache_keys = 2 * keys * itemsize + tiles <= shared
        left = shared - tiles if cache_keys else shared
        value_reads = _value_reads(sch, found.out, found.probs)
        # V staged through shared memory where a tile of it fits beside one row of scores
        stage_values = self.stage_values and not texels and value_reads is not None and \
            head_dim % lanes == 0 and \
            2 * keys * itemsize + _value_tile_bytes(head_dim, itemsize, lanes) <= left
        if stage_values:
            left -= _value_tile_bytes(head_dim, itemsize, lanes)
        elif lanes != LANES:  # the unstaged PV loop is written for one warp a row
            return FusedAttention(self.stage_values, LANES).apply(func, target, _tunable)
        rows = rows_per_block(keys, itemsize, threads, left, lanes)
        n_batch = len(out.iter_vars) - 3
        queries = int(out.iter_vars[-3].dom.extent)
        while rows > max(queries, 1):  # no thread rows beyond the queries (a decode step: 1)
            rows //= 2

        # PV: blockIdx = (batch.., row tile); threadIdx.y = row; threadIdx.x = head dim lanes
        loops = sch.get_loops(found.out)
        batch, i, e, j = loops[:n_batch], loops[n_batch], loops[n_batch + 1], loops[-1]
        io, ii = sch.split(i, [None, rows])
        if texels:  # an image output: each lane owns whole texels (4 consecutive outputs)
            # threadIdx.x spans a warp's LANES here as in the producers below: a smaller
            # extent for this loop alone (16 texels of a 64-wide head) is not guarded by TVM --
            # the launch takes the larger one and lanes 16..31 read V and write texels past
            # the head (NVIDIA's OpenCL faults, PoCL did not show it).  Texels first, then the
            # lanes, so the split's guard (texel < head_dim / 4) is free of the texel's lanes
            # and the texel loop still vectorises.
            et, e4 = sch.split(e, [None, TEXEL])
            eo, ex = sch.split(et, [None, LANES])
            sch.reorder(*batch, io, ii, ex, eo, e4, j)
        elif stage_values:  # keys outside the lane's outputs: one P read serves all of them
            # each lane owns head_dim / LANES consecutive outputs: one register array (the
            # strided e = eo * LANES + lane would make it an interval covering other lanes')
            ex, eo = sch.split(e, [lanes, None])
            jo, ji = sch.split(j, [None, lanes])
            sch.reorder(*batch, io, ii, ex, jo, ji, eo)
        else:
            eo, ex = sch.split(e, [None, LANES])
            sch.reorder(*batch, io, ii, ex, eo, j)
        bx = sch.fuse(*batch, io) if batch else io
        sch.bind(bx, "blockIdx.x")
        sch.bind(ii, "threadIdx.y")
        sch.bind(ex, "threadIdx.x")
        # accumulate in registers; the epilogue (head merge, bias ...) writes from them, one
        # output at a time (at the lane loop the strided outputs' region would be relaxed to
        # an interval covering other lanes' outputs) -- or one texel at a time into an image
        acc = sch.cache_write(found.out, 0, "local")
        _inline_epilogue(sch, _epilogue_names(sch))
        if stage_values:
            sch.reverse_compute_at(acc, ex, preserve_unit_loops=True)
            _stage_value_tiles(sch, found.out, value_reads, jo, rows, lanes)
        else:
            sch.reverse_compute_at(acc, eo, preserve_unit_loops=True)
        if texels:
            sch.vectorize(sch.get_loops(acc)[-1])

        # producers, last first, each at the block loop with rows on threadIdx.y
        for block in (found.probs, *reversed(found.stats)):
            sch.compute_at(block, bx, preserve_unit_loops=True)
            inner = sch.get_loops(block)[-2:]
            sch.bind(inner[0], "threadIdx.y")
            _, lane = sch.split(inner[1], [None, lanes])
            sch.bind(lane, "threadIdx.x")
            # for the statistics the key loop on threadIdx.x makes a warp reduction whose
            # result every lane keeps in a register: in shared memory, written by lane 0 and
            # read by all, TVM's ThreadSync sees the same index [threadIdx.y] on both sides,
            # takes it for one thread and leaves out the barrier (a race on real GPUs)
            sch.set_scope(block, 0, "shared" if block is found.probs else "local")
        _schedule_scores(sch, found.scores, bx, key_reads if cache_keys else [], rows, lanes)
        if stage_values:
            # the sums in registers start from zero before their loops (no test per step),
            # and the short inner loops unroll so each thread has its loads in flight at once
            sch.decompose_reduction(found.out, jo)
            sch.annotate(bx, "pragma_auto_unroll_max_step", UNROLL)
            sch.annotate(bx, "pragma_unroll_explicit", 1)
        if texels:  # an epilogue that does not vectorise is staged in registers (or declined)
            from .schedules import stage_texture_writes

            return stage_texture_writes(sch)
        return sch


def _value_reads(sch: s_tir.Schedule, out, probs) -> int | None:
    """Index of the PV block's read of ``V`` (the one that is not the probabilities), when
    there is exactly one such buffer read (``V`` itself, or its inlined prologue's input)."""
    written = _written(sch, probs)
    reads = [k for k, r in enumerate(sch.get(out).reads) if r.source not in written]
    return reads[0] if len(reads) == 1 else None


def _value_tile_bytes(head_dim: int, itemsize: int, lanes: int = LANES) -> int:
    """Shared memory budgeted for one staged tile of ``V``: ``lanes`` keys by the head
    dimension, with a word per row to spare (counted as the padded K tile is; the copy itself
    is not padded)."""
    return lanes * (head_dim + 1) * itemsize


def _stage_value_tiles(sch: s_tir.Schedule, out, read: int, jo, rows: int,
                       lanes: int = LANES) -> None:
    """Copy ``lanes`` keys' rows of ``V`` to shared memory per step of the key loop, by the
    whole block (coalesced): read from global memory, every row of the block (one warp each)
    fetched all of ``V`` again and each thread waited on one load per key.  Copy and reads
    both run along a row (lanes over the head dimension), so no padding is needed."""
    _stage_tile(sch, out, read, jo, rows, lanes)


def _writes_image(func: tirx.PrimFunc) -> bool:
    """Is the kernel's output a texture (``PackActivationsToTexture`` placed it in an image)?"""
    return bool(func.params) and is_texture(func.params[-1])


def _key_reads(sch: s_tir.Schedule, scores) -> list[int]:
    """Indices of the scores block's reads that depend on the key index (K, and in LLaMA the
    rotary tables): these are staged through shared memory 32 keys at a time."""
    block = sch.get(scores)
    key = block.iter_vars[-2].var
    return [k for k, region in enumerate(block.reads)
            if any(v.same_as(key) for r in region.region
                   for v in tirx.analysis.undefined_vars(r.min))]


def _schedule_scores(sch: s_tir.Schedule, scores, bx, key_reads: list[int], rows: int,
                     lanes: int = LANES) -> None:
    """Scores of the block's rows against ``lanes`` keys at a time: rows on threadIdx.y, keys
    on threadIdx.x, each score summed over the head dimension in a register.  The keys' rows
    of K are first copied to shared memory by the whole block (coalesced, padded by one word
    against bank conflicts); read straight from global memory, each lane would fetch another
    row and every warp load would touch 32 cache lines."""
    sch.compute_at(scores, bx, preserve_unit_loops=True)
    i, j, d = sch.get_loops(scores)[-3:]
    jo, lane = sch.split(j, [None, lanes])
    sch.reorder(jo, i, lane, d)
    sch.bind(i, "threadIdx.y")
    sch.bind(lane, "threadIdx.x")
    sch.set_scope(scores, 0, "shared")
    # each score summed in a register, stored to shared memory once: an accumulation in
    # shared memory would need a barrier per step
    copy = sch.cache_write(scores, 0, "local")
    sch.reverse_compute_at(copy, lane, preserve_unit_loops=True)
    for k in key_reads:
        tile = _stage_tile(sch, scores, k, jo, rows, lanes)
        sch.storage_align(tile, 0, axis=-2, factor=32, offset=1)


def _stage_tile(sch: s_tir.Schedule, block, read: int, loop, rows: int, lanes: int = LANES):
    """``block``'s ``read`` copied to shared memory at each step of ``loop`` by the whole
    thread block (``rows x lanes`` threads, consecutive lanes on consecutive elements);
    returns the copy block."""
    tile = sch.cache_read(block, read, "shared")
    sch.compute_at(tile, loop, preserve_unit_loops=True)
    depth = [sch.get(lp).same_as(sch.get(loop)) for lp in sch.get_loops(tile)].index(True) + 1
    loops = sch.get_loops(tile)[depth:]
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    _, ty, tx = sch.split(fused, [None, rows, lanes])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    return tile


def _inline_epilogue(sch: s_tir.Schedule, names: list[str]) -> None:
    """The epilogue blocks folded into the write-back of PV: all but the last inlined into
    their readers first, then the last (now the whole epilogue, reading PV's result and the
    kernel's inputs only) into the write-back.  Reverse-inlining them one by one in order
    breaks on an epilogue that reads PV's result twice (a hardswish, ``o * clip(o + 3, 0, 6)
    / 6``): the first block inlined takes over the write-back, and the second reader of the
    result is left reading a buffer nothing writes."""
    for name in names[:-1]:
        sch.compute_inline(sch.get_sblock(name))
    if names:
        sch.reverse_compute_inline(sch.get_sblock(names[-1]))


def _epilogue_names(sch: s_tir.Schedule) -> list[str]:
    """Blocks after the register write-back of PV (spatial, applied to its result)."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    local = [k for k, b in enumerate(blocks)
             if any(w.source.scope() == "local" for w in sch.get(b).writes)]
    if not local:
        return []
    # the write-back block follows the local accumulation; epilogue blocks follow it (in
    # dependence order, each reading PV's result and / or earlier epilogue blocks)
    return names[local[-1] + 2:]
