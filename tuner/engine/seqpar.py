"""Sequence parallelism: the world split into groups of N processes (train.sequence_parallel_size); a group
trains one micro-batch together, each process holding 1/N of each row's tokens (model/ulysses.py shards
the attention).

    world 4, N 2:  group 0 = ranks 0, 1 (data-parallel rank 0)   group 1 = ranks 2, 3 (data-parallel rank 1)

The sampler hands the same micro-batches to every process of a group (data-parallel rank = group index).
Each row is padded to a multiple of N (pads are samples of their own: position id 0, no loss), its labels
shifted before it is cut (a shard's last token predicts the next shard's first), and cut into N contiguous
pieces. Each process's loss is the sum over its own tokens; the loop divides by the trained tokens of the
whole step counted once per group, and DDP reduces the gradients over the whole world once, so the
result is what one process would compute on the whole rows.
"""

from __future__ import annotations

import torch

from tuner.data.dataset import IGNORE
from tuner.errors import TunerError


class SequenceParallel:
    def __init__(self, size: int, dist):
        world = dist.world_size
        if size > world or world % size:
            raise TunerError(f"train.sequence_parallel_size={size} with {world} process{'es' if world > 1 else ''}: "
                             f"the processes must form groups of {size}",
                             hint=f"run NPROC_PER_NODE={size} (or a multiple of it), or lower sequence_parallel_size")
        self.size, self.rank = size, dist.rank % size
        self.data_rank, self.data_world = dist.rank // size, world // size
        import torch.distributed as td

        self.group = None
        for g in range(self.data_world):  # (every process creates every group, in the same order)
            made = td.new_group(list(range(g * size, (g + 1) * size)))
            if g == self.data_rank:
                self.group = made

    def shard(self, batch: dict[str, torch.Tensor], pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(this process's piece of every row, the whole rows' position ids)."""
        ids, positions, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
        rows, length = ids.shape
        targets = torch.cat([labels[:, 1:], labels.new_full((rows, 1), IGNORE)], dim=1)
        pad = (-length) % self.size
        if pad:
            ids = torch.cat([ids, ids.new_full((rows, pad), pad_id)], dim=1)
            positions = torch.cat([positions, positions.new_zeros(rows, pad)], dim=1)
            targets = torch.cat([targets, targets.new_full((rows, pad), IGNORE)], dim=1)
        piece = (length + pad) // self.size
        mine = slice(self.rank * piece, (self.rank + 1) * piece)
        rest = {k: v for k, v in batch.items() if k not in ("input_ids", "position_ids", "labels")}
        return {**rest, "input_ids": ids[:, mine], "position_ids": positions[:, mine],
                "shift_labels": targets[:, mine]}, positions
