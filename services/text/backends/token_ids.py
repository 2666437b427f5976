"""Tokenising once: a text becomes the token ids the model consumes, on the preparation thread.

The count of a text's tokens (what the answer reports, what `strict` checks) and the ids the model runs on
come from one tokenizer call; the model thread only pads ids into a batch. A text longer than the model
takes is tokenised a second time by a truncating copy of the tokenizer, so its ids are exactly what the
model's own tokenizer gives (special tokens kept), whatever the tokenizer's template is.
"""

from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

# The inputs a BERT-like encoder takes, in the order the padded batch gives them.
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class TokenIds:
    """Texts to token ids (int64, special tokens included, cut to `max_tokens`) and ids to padded batches.

    `tokenizer` is not changed; both copies made of it are configured once and then only read, so the
    preparation threads may share them.
    """

    def __init__(
        self, tokenizer: Tokenizer, max_tokens: int, pad_id: int, input_names: Sequence[str]
    ) -> None:
        self.max_tokens = max_tokens
        self.input_names = tuple(input_names)
        self._pad_id = pad_id
        self._counting = Tokenizer.from_str(tokenizer.to_str())
        self._counting.no_truncation()
        self._counting.no_padding()
        self._truncating = Tokenizer.from_str(tokenizer.to_str())
        self._truncating.enable_truncation(max_tokens)
        self._truncating.no_padding()

    def encode(self, texts: list[str]) -> list[tuple[np.ndarray, int]]:
        """For each text: its ids (at most `max_tokens`) and how many tokens it has in full."""
        encodings = self._counting.encode_batch_fast(texts, add_special_tokens=True)
        counts = [len(encoding.ids) for encoding in encodings]
        long = [i for i, count in enumerate(counts) if count > self.max_tokens]
        if long:
            cut = self._truncating.encode_batch_fast([texts[i] for i in long], add_special_tokens=True)
            for i, encoding in zip(long, cut, strict=True):
                encodings[i] = encoding
        return [
            (np.asarray(encoding.ids, dtype=np.int64), count)
            for encoding, count in zip(encodings, counts, strict=True)
        ]

    def batch(self, ids: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """One padded batch: each row's ids then padding, its attention mask, and zero token types."""
        longest = max(len(row) for row in ids)
        input_ids = np.full((len(ids), longest), self._pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(ids), longest), dtype=np.int64)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1
        arrays = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": np.zeros_like(input_ids),
        }
        return {name: arrays[name] for name in self.input_names}
