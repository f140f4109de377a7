"""The weights that compete in a selection, and the top-k over them (select_mask's among= / exclude=)."""

from __future__ import annotations

import torch

from . import radix
from .keys import Source


class Pool:
    """The weights that compete in a selection: all of them, those ``among`` names (less
    those ``exclude`` names), or all but those ``exclude`` names.

    A restricted top-k runs a backend's unrestricted top-k over compact Sources: the
    competing weights gathered in position order and numbered consecutively, so scores
    and the tie rule are those of the unrestricted selection. ``exclude`` alone first
    takes the k + |exclude| best of all weights (which hold the k best of the rest),
    then the k best of those not excluded.

    sources: select_mask's Sources; among, exclude: name -> sorted local flat indices, or
    None; compact: the names whose Source.grad holds one value per index of among; comm:
    the collectives (a restricted count or numbering crosses ranks); full_numel: name ->
    the full parameter's size (not the shard's).
    """

    def __init__(self, sources, among, exclude, compact, comm, full_numel):
        self.sources, self.exclude, self.comm, self.full_numel = sources, exclude, comm, full_numel
        self.among = None if among is None else [self._competing(s, among, exclude, s.name in compact) for s in sources]

    @staticmethod
    def _competing(s: Source, among, exclude, is_compact: bool):
        """(indices, compact gradient or None) of source ``s``'s competing weights."""
        idx = among.get(s.name, _no_indices(s))
        grad = s.grad if is_compact else None
        if exclude is not None and s.name in exclude:
            keep = ~torch.isin(idx, exclude[s.name])
            idx, grad = idx[keep], (None if grad is None else grad[keep])
        return idx, grad

    def _excluded(self, s: Source) -> torch.Tensor:
        """The local flat indices of ``s`` that exclude names."""
        return self.exclude.get(s.name, _no_indices(s))

    def _all_sum(self, counts: list[int]) -> int:
        """sum(counts) over all ranks."""
        dev = self.sources[0].param.device  # NCCL sums device tensors, gloo CPU ones
        return int(self.comm.all_sum(torch.tensor(counts, dtype=torch.int64, device=dev)).sum())

    def count(self, ids: list[int]) -> int:
        """How many weights of these sources compete, over all ranks."""
        full = sum(self.full_numel[self.sources[i].name] for i in ids)  # the full parameters', not the shards'
        if self.among is not None:
            return self._all_sum([self.among[i][0].numel() for i in ids])
        if self.exclude is not None:
            return full - self._all_sum([self._excluded(self.sources[i]).numel() for i in ids])
        return full

    def topk(self, ids: list[int], k: int, topk) -> tuple[list[torch.Tensor], int | None]:
        """The k best competing weights of these sources: their local flat indices per source,
        and the threshold key. ``topk(sources, k)``: a backend's top-k (criterion etc. bound)."""
        group = [self.sources[i] for i in ids]
        if self.among is None and self.exclude is None:
            return topk(group, k)
        if k == 0:
            return [_no_indices(s) for s in group], None
        if self.among is not None:
            return self._topk_among(group, [self.among[i] for i in ids], k, topk)
        excluded = [self._excluded(s) for s in group]
        over = k + self._all_sum([e.numel() for e in excluded])
        best, _ = topk(group, min(over, sum(self.full_numel[s.name] for s in group)))
        kept = [(b[~torch.isin(b, e)], None) for b, e in zip(best, excluded)]
        return self._topk_among(group, kept, k, topk)

    def _topk_among(self, group, competing, k, topk):
        """Top-k over compact Sources of the ``competing`` (indices, compact gradient) per source."""
        offsets = self._compact_offsets([idx.numel() for idx, _ in competing], group[0].param.device)
        compact = []
        for s, (idx, grad), off in zip(group, competing, offsets):
            if grad is None and s.grad is not None:
                grad = radix.take(s.grad, idx)
            elif grad is None and not idx.numel():  # a parameter among leaves out had no gradient to check
                grad = s.param.new_empty(0)
            compact.append(Source(s.name, radix.take(s.param, idx), grad, off))
        chosen, key = topk(compact, k)
        return [idx[c] for (idx, _), c in zip(competing, chosen)], key

    def _compact_offsets(self, counts: list[int], dev) -> list[int]:
        """Each piece's first position when only the competing weights are numbered, in the
        unrestricted order (parameter, then rank, then flat index)."""
        every = self.comm.all_cat(torch.tensor(counts, dtype=torch.int64, device=dev)).cpu().view(self.comm.world, -1)
        per_param = every.sum(0)
        return (torch.cumsum(per_param, 0) - per_param + every[: self.comm.rank].sum(0)).tolist()


def _no_indices(s: Source) -> torch.Tensor:
    """An empty index tensor on the device of ``s``."""
    return torch.empty(0, dtype=torch.int64, device=s.param.device)
