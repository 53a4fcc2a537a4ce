"""A frozen input embedding that keeps in memory only the rows its lookups have read.

When the LM head has its own copy of the weights (preftune.models.prepare.store_frozen_linear_weights
unties it for bf16), the input embedding is only ever read a row per token, and its weight is a
view of the memory-mapped checkpoint. Reading a row through the mapping makes resident not the
row but the page-cache folio around it, and kernels with large folios map up to 2 MiB at a time:
in a bf16 DPO step of the embedded model 373 distinct tokens made 86 MiB of its 113 MiB table
resident (/proc/self/smaps of the mapped file, before and after the lookup). Here each row is
copied once, on its first lookup, into a compact table in the same dtype; the file pages that the
copy read are unmapped again, and lookups index the compact table. The numbers are the same
rows, bit for bit; memory is the rows seen (a few MiB for a few thousand distinct tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.memory import file_mappings, in_mapped_file, release_file_pages

MIN_CAPACITY = 1024  # rows; the table doubles when full


class SeenRowsEmbedding(torch.nn.Embedding):
    """`nn.Embedding` over a frozen weight that looks rows up in a table of the rows seen so far.

    `weight` stays the full (mapped) table, for anything that reads it; it must not change."""

    def __init__(self, source: torch.nn.Embedding) -> None:
        super().__init__(
            source.num_embeddings,
            source.embedding_dim,
            padding_idx=source.padding_idx,
            _weight=source.weight.detach(),
            _freeze=True,
        )
        # the mapped file the weight lies in, read once (not parsed again at every new row)
        self._mapping = [span for span in file_mappings() if in_mapped_file(self.weight, [span])]
        self._reset_rows()

    def _reset_rows(self) -> None:
        device = self.weight.device
        # slot of each token id in `_rows`, -1 until its row is read
        self._slot = torch.full((self.num_embeddings,), -1, dtype=torch.long, device=device)
        self._rows = self.weight.new_empty((0, self.embedding_dim))
        self._count = 0

    def _read_rows(self, token_ids: torch.Tensor) -> None:
        """Copy the rows of `token_ids` (distinct, not seen yet) from `weight` into `_rows`."""
        new = self.weight.detach()[token_ids]
        release_file_pages([self.weight.detach()], self._mapping)  # unmap what the copy read
        needed = self._count + len(token_ids)
        if needed > len(self._rows):
            capacity = max(MIN_CAPACITY, 2 * len(self._rows), needed)
            grown = self.weight.new_empty((min(capacity, self.num_embeddings), self.embedding_dim))
            grown[: self._count] = self._rows[: self._count]
            self._rows = grown
        self._rows[self._count : needed] = new
        self._slot[token_ids] = torch.arange(self._count, needed, device=self._slot.device)
        self._count = needed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:  # someone unfroze it: look up the weight itself
            return super().forward(input_ids)
        if self._slot.device != input_ids.device or self._rows.dtype != self.weight.dtype:
            self._reset_rows()  # the module was moved or cast
        slots = self._slot[input_ids]
        unseen = slots < 0
        if unseen.any():
            self._read_rows(input_ids[unseen].unique())
            slots = self._slot[input_ids]
        return F.embedding(slots, self._rows)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rows_seen={self._count}"


def keep_seen_rows_only(model: torch.nn.Module) -> bool:
    """Swap `model`'s frozen input embedding for a `SeenRowsEmbedding` (same weight); returns
    whether it did. Only a plain `nn.Embedding` without max_norm (which would write the weight)."""
    embedding = model.get_input_embeddings()
    if (
        type(embedding) is not torch.nn.Embedding
        or embedding.weight.requires_grad
        or embedding.max_norm is not None
    ):
        return False
    model.set_input_embeddings(SeenRowsEmbedding(embedding))
    return True
