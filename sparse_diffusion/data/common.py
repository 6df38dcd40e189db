"""What every dataset module shares: the errors a user can meet and the train / test split of
data that comes without one."""
from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """The data is not where it was looked for; the message names the place and the fix."""


class DatasetFormatError(ValueError):
    """A file or record does not hold what its format promises; the message names it."""


TEST_EVERY = 20  # image folders, ndjson files and KanjiVG: about 1 item in 20 goes to "test"


def every_nth_split(count: int, split: str, where: str, noun: str) -> list[int]:
    """Indices of the ``split`` items among ``count``: item i is "test" when i % 20 == 0, else "train".

    Item 0 always goes to "test", so fewer than 2 items would leave "train" empty: raises
    ValueError, one line naming ``where``, the count of ``noun``s and the minimum.
    """
    if count < 2:
        raise ValueError(f"{where} holds {count} {noun}{'' if count == 1 else 's'}; "
                         "a dataset needs at least 2 (one for the test split)")
    return [i for i in range(count) if (i % TEST_EVERY == 0) == (split == "test")]
