"""Which sequences each optimizer step trains on, and those steps' batches made ahead of time.

`StepSchedule` says which sequences a step uses (a pure function of seed, epoch and step, so a
resumed run continues with exactly the batches an uninterrupted run would have used).
`step_batches` makes each step's micro-batches in DataLoader worker processes while the model
trains on the previous step: collation and LLaVA's image decoding leave the main process, and on a
GPU the batches come in pinned memory so the copy to the device does not block.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from typing import Callable, Iterator

import torch


class StepSchedule:
    """Which sequences each optimizer step uses: a pure function of (seed, epoch, step)."""

    def __init__(self, n_sequences: int, batch_size: int, accumulative_counts: int, seed: int, shuffle: bool,
                 world_size: int = 1):
        self.n, self.batch_size, self.accum, self.seed, self.shuffle = (
            n_sequences, batch_size, accumulative_counts, seed, shuffle)
        self.world_size = world_size
        self.per_step = batch_size * accumulative_counts * world_size  # sequences per optimizer step, all ranks
        self.steps_per_epoch = math.ceil(n_sequences / self.per_step)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        generator = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def micro_batches(self, step: int, rank: int = 0) -> list[list[int]]:
        """This rank's micro-batches of a step. Every rank gets the same number of them (an empty
        one carries no loss), so processes stay in step; together they hold the step's sequences."""
        epoch, index = divmod(step, self.steps_per_epoch)
        chosen = self.order(epoch)[index * self.per_step:(index + 1) * self.per_step]
        count = math.ceil(math.ceil(len(chosen) / self.world_size) / self.batch_size)
        mine = chosen[rank::self.world_size]
        return [mine[i * self.batch_size:(i + 1) * self.batch_size] for i in range(count)]

    def kl_partners(self, step: int, rank: int = 0) -> list[list[int]]:
        """KTO: for each sequence of this rank's micro-batches (`micro_batches`), the sequence whose answer
        its KL row takes: the one before it in the step's micro-batch of all ranks together (rank r's
        micro-batch j is that one's [r::world_size]), so the KL rows of a step are the same for any
        number of processes. A micro-batch of one takes the next sequence of the epoch's order, and an
        empty one (it runs sequence 0) sequence 1: a KL row is never its own example."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        start = index * self.per_step
        chosen = order[start:start + self.per_step]
        size = self.batch_size * self.world_size
        partners = []
        for j in range(math.ceil(len(chosen) / size)):  # (as many micro-batches as micro_batches gives)
            together = chosen[j * size:(j + 1) * size]
            mine = together[rank::self.world_size]
            if not mine:
                partners.append([1 % self.n])
            elif len(together) == 1:
                partners.append([order[(start + j * size + 1) % self.n]])
            else:
                before = together[-1:] + together[:-1]
                partners.append(before[rank::self.world_size])
        return partners


@dataclass
class StepData:
    """One rank's part of one optimizer step."""
    batches: list[dict[str, torch.Tensor]]
    weights: list[float]
    """1 for a real micro-batch; 0 for an empty one (the last step's remainder on some ranks), which
    runs sequence 0 so every rank does the same work, and carries no loss"""
    trained_tokens: int
    """what the loss is averaged over: label tokens (SFT), pairs (preference objectives)"""
    real_tokens: int
    """tokens of the sequences, without padding (what throughput counts)"""

    def pin_memory(self) -> "StepData":  # the DataLoader's pinning thread calls this
        self.batches = [{k: v.pin_memory() for k, v in b.items()} for b in self.batches]
        return self


class StepBatches(torch.utils.data.Dataset):
    """Item `step`: this rank's collated micro-batches of that step."""

    def __init__(self, schedule: StepSchedule, sequences, collate: Callable, pad_id: int, rank: int,
                 units: Callable[[dict], int]):
        self.schedule, self.sequences, self.collate, self.pad_id, self.rank, self.units = (
            schedule, sequences, collate, pad_id, rank, units)

    def __getitem__(self, step: int) -> StepData:
        micro_batches = self.schedule.micro_batches(step, self.rank)
        weights = [1.0 if idx else 0.0 for idx in micro_batches]
        if getattr(self.sequences, "kl_rows", False):  # KTO: each example's KL row takes another one's answer
            partners = self.schedule.kl_partners(step, self.rank)
            batches = [self.collate([self.sequences[i] for i in idx or [0]], self.pad_id,
                                    [self.sequences[i] for i in others]) for idx, others in zip(micro_batches, partners)]
        else:
            batches = [self.collate([self.sequences[i] for i in idx or [0]], self.pad_id) for idx in micro_batches]
        trained = sum(int(w) * self.units(b) for w, b in zip(weights, batches))
        real = sum(self.sequences.num_tokens(i) for idx in micro_batches for i in idx)
        return StepData(batches, weights, trained, real)


def _as_is(step: StepData) -> StepData:
    return step


def _worker_ignores_signals(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the main process stops after the step (and ends its
    # workers); a worker that died of it first would turn a clean stop into a DataLoader error.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def step_batches(dataset: StepBatches, start: int, stop: int, workers: int, pin: bool) -> Iterator[StepData]:
    """Steps start..stop-1 in order, `workers` processes making them ahead (0: made here when asked)."""
    if workers == 0:
        return (dataset[step] for step in range(start, stop))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start, stop), collate_fn=_as_is, num_workers=workers,
        pin_memory=pin, prefetch_factor=2, worker_init_fn=_worker_ignores_signals,
        generator=torch.Generator().manual_seed(start),  # (its workers' seed is not drawn from the restored RNG)
        multiprocessing_context="fork")  # the token store is memory-mapped: fork shares it, spawn would copy it
    return iter(loader)
