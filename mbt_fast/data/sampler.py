"""A DistributedSampler that can resume mid-epoch and hands each example its own seed."""
from __future__ import annotations

from torch.utils.data import DistributedSampler

from mbt_fast.data.dataset import item_seed


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (same shuffling and rank sharding) that yields ``(index, seed)``.

    - ``seed`` for an example depends only on (sampler seed, epoch, index), so augmentations are
      identical whether data loads in the main process or in workers, and after a resume;
    - ``set_position(epoch, start)`` skips the first ``start`` examples of this rank's epoch, which is
      how a resumed run continues exactly where the checkpoint left off.
    Works without an initialised process group (``num_replicas=1, rank=0``).
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())
        for i in indices[self.start:]:
            yield (i, item_seed(self.seed, self.epoch, i))

    def __len__(self):
        return self.num_samples - self.start


def eval_sampler(dataset, num_replicas: int = 1, rank: int = 0):
    """Unshuffled shard for evaluation: rank r takes examples r, r + W, ... (no padding duplicates)."""
    return list(range(rank, len(dataset), num_replicas))



