"""PyTorch's ``Dataset`` and ``DataLoader`` as data (:class:`actclust.capture.data.Source`).

Imported only when the data is one of them (so torch is imported already). A ``DataLoader``
must read its dataset in order: results line up with samples by position.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, SequentialSampler, Subset

from ..capture.data import Source
from ..exceptions import DataError

__all__ = ["source", "TorchSource", "rows_of"]


def rows_of(loader: DataLoader, start: int, stop: int) -> DataLoader:
    """The samples ``start:stop`` of ``loader``'s dataset as one batch, with the loader's own collate_fn."""
    return DataLoader(Subset(loader.dataset, list(range(start, stop))), batch_size=stop - start,
                      collate_fn=loader.collate_fn)


class TorchSource(Source):
    def __init__(self, loader: DataLoader, n_samples: Optional[int]):
        self.loader, self.n_samples = loader, n_samples

    def __iter__(self):
        return iter(self.loader)

    def take(self, idx):
        """The samples at ``idx`` as a loader of them with this loader's own collate_fn: the dataset's raw items (a
        collate_fn that tokenizes texts) were not what the model takes, and drawing a loader's training samples failed
        with "must hold tensors; found a list" (an outside check)."""
        idx = np.asarray(idx, dtype=np.int64).tolist()
        return DataLoader(Subset(self.loader.dataset, idx), batch_size=max(1, len(idx)), collate_fn=self.loader.collate_fn)


def source(data, batch_size: int, name: str) -> Optional[TorchSource]:
    """The batches of a ``DataLoader`` (checked for order) or of a ``Dataset`` read in order."""
    if isinstance(data, DataLoader):
        _check_order(data, name)
        return TorchSource(data, _safe_len(data.dataset))
    if isinstance(data, Dataset):
        return TorchSource(DataLoader(data, batch_size=batch_size, shuffle=False), _safe_len(data))
    return None


def _safe_len(dataset) -> Optional[int]:
    try:
        return len(dataset)
    except TypeError:
        return None


def _check_order(loader: DataLoader, name: str) -> None:
    """Refuse loaders that do not read their dataset in order: results would not line up."""
    if isinstance(loader.dataset, IterableDataset):
        return  # its own order; nothing to check
    bs = loader.batch_sampler
    sampler = loader.sampler if bs is None else getattr(bs, "sampler", None)
    if bs is not None and type(bs) is not BatchSampler:
        raise DataError(
            f"The DataLoader passed as {name} uses a custom batch_sampler ({type(bs).__name__}); actclust "
            "lines results up with samples by position, so it needs the dataset read in order: pass "
            "DataLoader(dataset, batch_size=..., shuffle=False)."
        )
    if type(sampler) is not SequentialSampler:
        raise DataError(
            f"The DataLoader passed as {name} draws its samples with a {type(sampler).__name__}; actclust "
            "lines results up with samples by position, so it needs them in order: pass "
            "DataLoader(dataset, shuffle=False) (for a subset, torch.utils.data.Subset(dataset, indices))."
        )
    if bs is not None and bs.drop_last and len(loader.dataset) % bs.batch_size:
        raise DataError(
            f"The DataLoader passed as {name} has drop_last=True and would skip the last "
            f"{len(loader.dataset) % bs.batch_size} samples; pass drop_last=False."
        )
