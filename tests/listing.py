"""A whole listing body parsed in memory by the sync's own rules: the tests' oracle.

store.apply streams a body through records.parse_record and friends; this says what that
must come to, record by record: the valid rows by id (the last occurrence wins), the
rejects, the ids they protect, and whether the listing is complete.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from sync.jsonstream import ListingStream
from sync.records import DatasetRow, InvalidRecord, Reject, dataset_key, parse_record


@dataclass
class Listing:
    """A parsed listing: the valid rows by id (last occurrence wins) and the rejects."""

    rows: dict[str, DatasetRow] = field(default_factory=dict)
    rejects: list[Reject] = field(default_factory=list)
    seen: int = 0
    duplicates: list[str] = field(default_factory=list)

    @property
    def protected_ids(self) -> set[str]:
        """Ids of rejected records: their stored rows must be left exactly as they are."""
        return {r.dataset_id for r in self.rejects if r.dataset_id} - self.rows.keys()

    @property
    def complete(self) -> bool:
        """False when a reject had no usable id, so absence from the listing proves nothing."""
        return all(r.dataset_id for r in self.rejects)


def parse_listing(body: bytes | str) -> Listing:
    """Parse a whole response body into a Listing; raise ResponseError when it is unusable.

    Holds every row in memory. The sync streams the body through the same rules instead.
    """
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    stream = ListingStream(io.BytesIO(body))
    listing = Listing()
    for index, record in enumerate(stream):
        dataset_id = dataset_key(record)
        try:
            row = parse_record(record)
        except InvalidRecord as exc:
            listing.rejects.append(Reject(index, dataset_id, str(exc)))
            if dataset_id is not None:
                # The last occurrence decides; a rejected one leaves the stored row alone.
                listing.rows.pop(dataset_id, None)
            continue
        if row.dataset_id in listing.rows:
            listing.duplicates.append(row.dataset_id)
        listing.rows[row.dataset_id] = row
    listing.seen = stream.seen
    return listing
