"""Coalesced torch.distributed implementation of the :class:`~ds_soo.distributed.exchange.Exchange` calls.

Every call issues O(1) collectives regardless of how many parameters or blocks there are:

- ``gather_blocks`` / ``scatter_blocks``: one ``all_to_all_single`` each. Split sizes are known on
  every rank from the layouts and the block index, so nothing is exchanged to size the buffers.
  A one-float flag per (peer, block) rides in the same buffer so that "no rank had a gradient"
  (gather) and "the owner produced no result" (scatter) are decided identically everywhere.
- ``reduce_to_owners``: per bucket, one ``reduce_scatter`` over owner segments padded to the largest
  one, or (when padding would waste too much) one ``reduce`` per owner.
- ``any_true``: one ``all_reduce(MAX)``.

Send/receive index plans are built once per block index and cached by the identity of the
``blocks`` dict, so treat a block index as immutable and build a new dict to change it. gloo (the
CPU test backend) supports all of the collectives used here, including uneven all_to_all_single.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ds_soo.distributed.exchange import BlockIndex
from ds_soo.distributed.layout import GradientAccess, ParamLayout

_FLAG_ON = 0.5


def _reduce_scatter(output: torch.Tensor, inp: torch.Tensor, group) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(output, inp, group=group)


def _all_gather(output: torch.Tensor, inp: torch.Tensor, group) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(output, inp, group=group)


@dataclass
class _Chunk:
    """A run of elements of one parameter that one peer's flag governs."""

    start: int  # into the per-name concatenated index tensors
    end: int
    flag_pos: int  # position of the governing flag in the receive buffer


@dataclass
class _Copy:
    """Per parameter: buffer positions <-> positions in ``access.local_grad(name)``."""

    local: list[torch.Tensor] = field(default_factory=list)
    buf: list[torch.Tensor] = field(default_factory=list)
    chunks: list[_Chunk] = field(default_factory=list)
    size: int = 0

    def add(self, local: torch.Tensor, buf: torch.Tensor, flag_pos: int = -1) -> None:
        if local.numel() == 0:
            return
        self.local.append(local)
        self.buf.append(buf)
        self.chunks.append(_Chunk(self.size, self.size + local.numel(), flag_pos))
        self.size += local.numel()

    def freeze(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[_Chunk]]:
        return torch.cat(self.local).to(device), torch.cat(self.buf).to(device), self.chunks


@dataclass
class _GatherPlan:
    send_splits: list[int]
    recv_splits: list[int]
    send: dict[str, tuple[torch.Tensor, torch.Tensor, list[_Chunk]]]
    send_flags: list[tuple[int, tuple[str, ...]]]  # (send-buffer position, names this rank provides)
    owned: list[str]
    perm: dict[str, torch.Tensor]  # owned block -> receive-buffer position of each block element
    flag_pos: torch.Tensor  # (len(owned), world) receive-buffer positions of the per-peer flags


@dataclass
class _ScatterPlan:
    send_splits: list[int]
    recv_splits: list[int]
    owned: list[str]
    send_flag_pos: dict[str, list[int]]  # owned block -> its flag position in each peer's send region
    send_vals: dict[str, tuple[torch.Tensor, torch.Tensor]]  # owned block -> (block positions, buffer positions)
    recv: dict[str, tuple[torch.Tensor, torch.Tensor, list[_Chunk]]]
    recv_flag_pos: torch.Tensor


@dataclass
class _CacheEntry:
    blocks: BlockIndex  # kept alive so that id() cannot be reused while cached
    owner_of: dict[str, int]
    gather: _GatherPlan | None = None
    scatter: _ScatterPlan | None = None


def _providers(layout: ParamLayout, idx: torch.Tensor, world: int) -> tuple[torch.Tensor, list[int]]:
    """Stable order of ``idx`` positions grouped by providing rank, and the per-rank boundaries."""
    spans = sorted((s, e, r) for r, (s, e) in enumerate(layout.provided) if e > s)
    starts = torch.tensor([s for s, _, _ in spans], dtype=torch.long)
    ends = torch.tensor([e for _, e, _ in spans], dtype=torch.long)
    ranks = torch.tensor([r for _, _, r in spans], dtype=torch.long)
    slot = torch.searchsorted(starts, idx, right=True) - 1
    if idx.numel() and (bool((slot < 0).any()) or bool((idx >= ends[slot.clamp(min=0)]).any())):
        raise ValueError(f"{layout.name}: block indices outside every rank's provided range")
    prov = ranks[slot]
    order = torch.argsort(prov, stable=True)
    counts = torch.bincount(prov, minlength=world).tolist()
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return order, bounds


class CollectiveExchange:
    """Exchange over a torch.distributed process group; see the module docstring for the collectives.

    ``bucket_mb`` caps one ``reduce_to_owners`` collective; ``pad_ratio`` is how much larger than the
    data a padded reduce_scatter buffer may be before per-owner reduces are used instead. ``dtype`` is
    the dtype gradient blocks travel in (the preconditioner's state dtype: float64 for a float64 model);
    it must be the same on every rank.
    """

    def __init__(
        self,
        access: GradientAccess,
        group: dist.ProcessGroup | None = None,
        bucket_mb: float = 25.0,
        pad_ratio: float = 1.5,
        max_cached_plans: int = 8,
        verify_plans: bool = True,
        dtype: torch.dtype = torch.float32,
    ):
        self.access = access
        self.dtype = dtype
        # Adapters whose ranks are a sub-group (a DeepSpeed/FSDP2 data-parallel group) say so.
        self.group = group if group is not None else getattr(access, "group", None)
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        if access.world_size != self.world_size or access.rank != self.rank:
            raise ValueError(
                f"access is rank {access.rank}/{access.world_size} but the group is {self.rank}/{self.world_size}"
            )
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.pad_ratio = pad_ratio
        self.device = torch.device(getattr(access, "device", None) or "cpu")
        self.verify_plans = verify_plans
        self._max_cached = max_cached_plans
        self._cache: OrderedDict[int, _CacheEntry] = OrderedDict()
        self._layouts: dict[str, ParamLayout] | None = None

    # ------------------------------------------------------------------ helpers
    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def layouts(self) -> dict[str, ParamLayout]:
        if self._layouts is None:
            self._layouts = self.access.param_layouts()
        return self._layouts

    def _entry(self, blocks: BlockIndex, owner_of: dict[str, int]) -> _CacheEntry:
        e = self._cache.get(id(blocks))
        if e is not None and e.blocks is blocks and all(owner_of.get(b) == o for b, o in e.owner_of.items()):
            self._cache.move_to_end(id(blocks))
            return e
        owners = {b: int(owner_of[b]) for b in blocks}
        bad = {b: o for b, o in owners.items() if not 0 <= o < self.world_size}
        if bad:
            raise ValueError(f"owner ranks outside [0, {self.world_size}): {bad}")
        unknown = sorted({n for pieces in blocks.values() for n, _ in pieces} - set(self.layouts()))
        if unknown:
            raise ValueError(f"block index names parameters the engine adapter does not know: {unknown}")
        if self.verify_plans:
            self._check_identical(blocks, owners)
        e = _CacheEntry(blocks, owners)
        self._cache[id(blocks)] = e
        while len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)
        return e

    def _check_identical(self, blocks: BlockIndex, owners: dict[str, int]) -> None:
        """One all_reduce per new plan: a block index that differs between ranks would deadlock later."""
        h = hashlib.sha256()
        for b in sorted(blocks):
            h.update(f"{b}:{owners[b]}".encode())
            for name, idx in blocks[b]:
                h.update(f"{name}:{idx.numel()}:{int(idx.sum()) if idx.numel() else 0};".encode())
        v = int.from_bytes(h.digest()[:7], "little")
        t = torch.tensor([v, -v], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        if int(t[0]) != -int(t[1]):
            raise RuntimeError("block index or owners differ between ranks; build them identically everywhere")

    def _owned_by(self, owners: dict[str, int]) -> list[list[str]]:
        per: list[list[str]] = [[] for _ in range(self.world_size)]
        for b in sorted(owners):
            per[owners[b]].append(b)
        return per

    # ------------------------------------------------------------------ plans
    def _gather_plan(self, blocks: BlockIndex, owners: dict[str, int]) -> _GatherPlan:
        layouts, me, world = self.layouts(), self.rank, self.world_size
        owned_by = self._owned_by(owners)
        # Provider grouping of every piece this rank either sends from or (as owner) receives into.
        groups: dict[tuple[str, int], tuple[torch.Tensor, list[int]]] = {}
        for b, pieces in blocks.items():
            for k, (name, idx) in enumerate(pieces):
                groups[(b, k)] = _providers(layouts[name], idx.reshape(-1).cpu().long(), world)

        send = {}
        copies: dict[str, _Copy] = {}
        send_flags: list[tuple[int, tuple[str, ...]]] = []
        send_splits = []
        pos = 0
        for o in range(world):
            region = pos
            pos += len(owned_by[o])
            for j, b in enumerate(owned_by[o]):
                names: list[str] = []
                for k, (name, idx) in enumerate(blocks[b]):
                    order, bounds = groups[(b, k)]
                    mine = order[bounds[me] : bounds[me + 1]]
                    if mine.numel() == 0:
                        continue
                    names.append(name)
                    local = idx.reshape(-1).cpu().long()[mine] - layouts[name].held[me][0]
                    copies.setdefault(name, _Copy()).add(local, torch.arange(pos, pos + mine.numel()))
                    pos += mine.numel()
                send_flags.append((region + j, tuple(dict.fromkeys(names))))
            send_splits.append(pos - region)
        for name, c in copies.items():
            self._check_held(layouts[name], c)
            send[name] = c.freeze(self.device)

        owned = owned_by[me]
        recv_splits, perm_parts = [], {b: [] for b in owned}
        flag_pos = torch.zeros((len(owned), world), dtype=torch.long)
        pos = 0
        for r in range(world):
            region = pos
            flag_pos[:, r] = torch.arange(region, region + len(owned))
            pos += len(owned)
            for b in owned:
                offset = 0
                for k, (_, idx) in enumerate(blocks[b]):
                    order, bounds = groups[(b, k)]
                    theirs = order[bounds[r] : bounds[r + 1]]
                    if theirs.numel():
                        perm_parts[b].append((theirs + offset, torch.arange(pos, pos + theirs.numel())))
                        pos += theirs.numel()
                    offset += idx.numel()
            recv_splits.append(pos - region)
        perm = {}
        for b in owned:
            n = sum(idx.numel() for _, idx in blocks[b])
            p = torch.empty(n, dtype=torch.long)
            for block_pos, buf_pos in perm_parts[b]:
                p[block_pos] = buf_pos
            perm[b] = p.to(self.device)
        return _GatherPlan(send_splits, recv_splits, send, send_flags, owned, perm, flag_pos.to(self.device))

    def _check_held(self, layout: ParamLayout, c: _Copy) -> None:
        s, e = layout.held[self.rank]
        hi = max(int(t.max()) for t in c.local)
        if min(int(t.min()) for t in c.local) < 0 or hi >= e - s:
            raise ValueError(f"{layout.name}: rank {self.rank} provides indices outside its held range")

    def _scatter_plan(self, blocks: BlockIndex, owners: dict[str, int]) -> _ScatterPlan:
        layouts, me, world = self.layouts(), self.rank, self.world_size
        owned_by = self._owned_by(owners)

        def held_positions(name: str, idx: torch.Tensor, r: int) -> torch.Tensor:
            s, e = layouts[name].held[r]
            if s == 0 and e >= layouts[name].numel:
                return torch.arange(idx.numel())
            return torch.nonzero((idx >= s) & (idx < e)).reshape(-1)

        # Owner side: what this rank sends to each holder of its blocks.
        owned = owned_by[me]
        send_flag_pos: dict[str, list[int]] = {b: [] for b in owned}
        vals: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {b: [] for b in owned}
        send_splits, pos = [], 0
        for r in range(world):
            region = pos
            for j, b in enumerate(owned):
                send_flag_pos[b].append(region + j)
            pos += len(owned)
            for b in owned:
                offset = 0
                for name, idx in blocks[b]:
                    flat = idx.reshape(-1).cpu().long()
                    sel = held_positions(name, flat, r)
                    if sel.numel():
                        vals[b].append((sel + offset, torch.arange(pos, pos + sel.numel())))
                        pos += sel.numel()
                    offset += flat.numel()
            send_splits.append(pos - region)
        send_vals = {}
        for b in owned:
            if vals[b]:
                send_vals[b] = tuple(torch.cat(t).to(self.device) for t in zip(*vals[b], strict=True))

        # Holder side: what this rank receives from each owner, and where it goes.
        copies: dict[str, _Copy] = {}
        recv_splits, pos = [], 0
        recv_flag_pos = []
        for o in range(world):
            region = pos
            pos += len(owned_by[o])
            for j, b in enumerate(owned_by[o]):
                recv_flag_pos.append(region + j)
                for name, idx in blocks[b]:
                    flat = idx.reshape(-1).cpu().long()
                    sel = held_positions(name, flat, me)
                    if sel.numel():
                        local = flat[sel] - layouts[name].held[me][0]
                        copies.setdefault(name, _Copy()).add(local, torch.arange(pos, pos + sel.numel()), region + j)
                        pos += sel.numel()
            recv_splits.append(pos - region)
        recv = {name: c.freeze(self.device) for name, c in copies.items()}
        flags = torch.tensor(recv_flag_pos, dtype=torch.long, device=self.device)
        return _ScatterPlan(send_splits, recv_splits, owned, send_flag_pos, send_vals, recv, flags)

    def _all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        recv = torch.empty(sum(recv_splits), dtype=send.dtype, device=send.device)
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group)
        return recv

    # ------------------------------------------------------------------ Exchange API
    def gather_blocks(
        self, blocks: BlockIndex, owner_of: dict[str, int], read: Callable[[str], torch.Tensor | None] | None = None
    ) -> dict[str, torch.Tensor | None]:
        read = read or self.access.local_grad
        e = self._entry(blocks, owner_of)
        if e.gather is None:
            e.gather = self._gather_plan(blocks, e.owner_of)
        plan = e.gather
        buf = torch.zeros(sum(plan.send_splits), dtype=self.dtype, device=self.device)
        has: dict[str, bool] = {}
        for name, (local, pos, _) in plan.send.items():
            g = read(name)
            has[name] = g is not None
            if g is not None:
                buf[pos] = g.detach().reshape(-1)[local].to(self.dtype)
        on = [p for p, names in plan.send_flags if any(has.get(n, False) for n in names)]
        if on:  # one indexed write, not one tiny kernel per (peer, block)
            buf[torch.tensor(on, dtype=torch.long, device=self.device)] = 1.0
        recv = self._all_to_all(buf, plan.send_splits, plan.recv_splits)
        seen = (recv[plan.flag_pos] > _FLAG_ON).any(dim=1).tolist() if plan.owned else []
        return {b: recv[plan.perm[b]] if s else None for b, s in zip(plan.owned, seen, strict=True)}

    def scatter_blocks(self, blocks: BlockIndex, owner_of: dict[str, int], results: dict[str, torch.Tensor]) -> None:
        e = self._entry(blocks, owner_of)
        if e.scatter is None:
            e.scatter = self._scatter_plan(blocks, e.owner_of)
        plan = e.scatter
        buf = torch.zeros(sum(plan.send_splits), dtype=self.dtype, device=self.device)
        on: list[int] = []
        for b in plan.owned:
            vec = results.get(b)
            if vec is None:
                continue
            n = sum(idx.numel() for _, idx in blocks[b])
            if vec.numel() != n:
                raise ValueError(f"result for block {b!r} has {vec.numel()} elements, expected {n}")
            on.extend(plan.send_flag_pos[b])
            if b in plan.send_vals:
                src, dst = plan.send_vals[b]
                buf[dst] = vec.detach().reshape(-1).to(device=self.device, dtype=self.dtype)[src]
        if on:
            buf[torch.tensor(on, dtype=torch.long, device=self.device)] = 1.0
        recv = self._all_to_all(buf, plan.send_splits, plan.recv_splits)
        all_on = plan.recv_flag_pos.numel() == 0 or bool((recv[plan.recv_flag_pos] > _FLAG_ON).all())
        for name, (local, pos, chunks) in plan.recv.items():
            g = self.access.local_grad(name)
            if g is None:
                continue
            flat = g.view(-1)
            if all_on:
                flat[local] = recv[pos].to(flat.dtype)
                continue
            for c in chunks:
                if recv[c.flag_pos] > _FLAG_ON:
                    flat[local[c.start : c.end]] = recv[pos[c.start : c.end]].to(flat.dtype)

    def reduce_to_owners(self, tensors: dict[str, torch.Tensor], owner_of: dict[str, int]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for bucket in self._buckets(tensors):
            self._reduce_bucket(bucket, tensors, owner_of, out)
        return out

    def _buckets(self, tensors: dict[str, torch.Tensor]) -> list[list[str]]:
        """Keys in a rank-independent order, split by dtype/device and into buckets of ~bucket_bytes."""
        by_kind: dict[tuple[torch.dtype, str], list[str]] = {}
        for k in sorted(tensors):
            t = tensors[k]
            by_kind.setdefault((t.dtype, str(t.device)), []).append(k)
        buckets = []
        for kind in sorted(by_kind, key=str):
            cur, size = [], 0
            for k in by_kind[kind]:
                nbytes = tensors[k].numel() * tensors[k].element_size()
                if cur and size + nbytes > self.bucket_bytes:
                    buckets.append(cur)
                    cur, size = [], 0
                cur.append(k)
                size += nbytes
            if cur:
                buckets.append(cur)
        return buckets

    def _reduce_bucket(self, keys: list[str], tensors, owner_of, out) -> None:
        world = self.world_size
        per: list[list[str]] = [[] for _ in range(world)]
        for k in keys:
            per[int(owner_of[k])].append(k)
        sizes = [sum(tensors[k].numel() for k in ks) for ks in per]
        total, longest = sum(sizes), max(sizes)
        proto = tensors[keys[0]]
        if world * longest <= self.pad_ratio * total:
            flat = torch.zeros(world * longest, dtype=proto.dtype, device=proto.device)
            for o, ks in enumerate(per):
                pos = o * longest
                for k in ks:
                    n = tensors[k].numel()
                    flat[pos : pos + n] = tensors[k].reshape(-1)
                    pos += n
            mine = torch.empty(longest, dtype=proto.dtype, device=proto.device)
            _reduce_scatter(mine, flat, self.group)
            self._unpack(mine, per[self.rank], tensors, out)
            return
        for o, ks in enumerate(per):
            if not ks:
                continue
            flat = torch.cat([tensors[k].reshape(-1) for k in ks])
            dist.reduce(flat, dst=self._global(o), group=self.group)
            if o == self.rank:
                self._unpack(flat, ks, tensors, out)

    @staticmethod
    def _unpack(flat: torch.Tensor, keys: list[str], tensors, out) -> None:
        pos = 0
        for k in keys:
            n = tensors[k].numel()
            out[k] = flat[pos : pos + n].view(tensors[k].shape)
            pos += n

    def any_true(self, flag: bool) -> bool:
        return self.any_true_many([flag])[0]

    def any_true_many(self, flags: list[bool]) -> list[bool]:
        """Element-wise OR of the flags over ranks, in one all_reduce."""
        if not flags:
            return []
        t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return [bool(v) for v in t.tolist()]

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, on every rank (one all_reduce on a copy)."""
        out = t.detach().clone().to(self.device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def broadcast_from_owners(
        self, tensors: dict[str, torch.Tensor], owner_of: dict[str, int]
    ) -> dict[str, torch.Tensor]:
        """Give every rank the owner's value of every tensor, in place (the replication knob).

        Every rank passes every key with the right shape and dtype; non-owners' contents are
        overwritten. One padded all_gather per bucket, or one broadcast per owner when padding
        would waste more than ``pad_ratio``.
        """
        world = self.world_size
        for keys in self._buckets(tensors):
            per: list[list[str]] = [[] for _ in range(world)]
            for k in keys:
                per[int(owner_of[k])].append(k)
            sizes = [sum(tensors[k].numel() for k in ks) for ks in per]
            proto = tensors[keys[0]]
            if world * max(sizes) <= self.pad_ratio * sum(sizes):
                longest = max(sizes)
                mine = torch.zeros(longest, dtype=proto.dtype, device=proto.device)
                if per[self.rank]:
                    mine[: sizes[self.rank]] = torch.cat([tensors[k].reshape(-1) for k in per[self.rank]])
                full = torch.empty(world * longest, dtype=proto.dtype, device=proto.device)
                _all_gather(full, mine, self.group)
                for o, ks in enumerate(per):
                    self._copy_out(full[o * longest : o * longest + sizes[o]], ks, tensors)
                continue
            for o, ks in enumerate(per):
                if not ks:
                    continue
                flat = torch.cat([tensors[k].reshape(-1) for k in ks])
                dist.broadcast(flat, src=self._global(o), group=self.group)
                if o != self.rank:
                    self._copy_out(flat, ks, tensors)
        return tensors

    @staticmethod
    def _copy_out(flat: torch.Tensor, keys: list[str], tensors) -> None:
        pos = 0
        for k in keys:
            n = tensors[k].numel()
            tensors[k].copy_(flat[pos : pos + n].view(tensors[k].shape))
            pos += n
