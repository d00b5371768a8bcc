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

Preference pairs (DPO, SimPO, ORPO) stay within one group: a row's `sample_ids` (which answer each token
belongs to) are shifted and cut like its labels, each process sums its piece's log-probs per answer, and
the group adds them up (engine/preference.py) before the loss, which is not a sum over tokens.
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
        ids, positions = batch["input_ids"], batch["position_ids"]
        rows, length = ids.shape
        pad = (-length) % self.size

        def padded(x: torch.Tensor, value: int) -> torch.Tensor:
            return torch.cat([x, x.new_full((rows, pad), value)], dim=1) if pad else x

        ids, positions = padded(ids, pad_id), padded(positions, 0)
        piece = (length + pad) // self.size
        mine = slice(self.rank * piece, (self.rank + 1) * piece)
        out = {k: v for k, v in batch.items() if k not in ("input_ids", "position_ids", "labels")}
        out.update(input_ids=ids[:, mine], position_ids=positions[:, mine])
        # (sample_ids stay whole too: the pairs are counted from them)
        for name, shifted, none in (("labels", "shift_labels", IGNORE), ("sample_ids", "shift_sample_ids", -1)):
            if name in batch:  # output n predicts token n + 1: shifted before the cut
                x = batch[name]
                out[shifted] = padded(torch.cat([x[:, 1:], x.new_full((rows, 1), none)], dim=1), none)[:, mine]
        return out, positions
