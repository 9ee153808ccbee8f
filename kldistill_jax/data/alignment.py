"""Character-span alignment of two tokenizations of the same text (cross-tokenizer distillation).

Two tokenizers split a text at different places: "12+34" may be 1|2|+|3|4 for one and 12|+|34 for the
other. Both models condition on the same text wherever both tokenizations CUT at the same character, so
the text between consecutive common cuts is a span both models can score: each as the sum of its own
tokens' log-probs there. `align` finds those spans ("groups") from each token's [start, end) character span.

Everything here is host-side Python / numpy on one row; `train.cross_tokenizer` builds batches from it.

    pieces = decode_pieces(tokenizer.decode, ids)           # the text each id adds, in order
    spans = spans_of(pieces)                                # [n, 2] character [start, end) per id
    ids_b, spans_b, valid_b = encode_with_spans(other, "".join(pieces))
    a_group, b_group, count = align(spans, spans_b, b_valid=valid_b)
"""

import numpy as np

from kldistill_jax.errors import UserError

REPLACEMENT = "\ufffd"  # what decoders show for an incomplete UTF-8 sequence


def decode_pieces(decode, ids, *, prefix=(), context=4, max_pending=4) -> list[str]:
  """The text each of `ids` adds when they are decoded left to right after `prefix`.

  A piece is decode(prefix + ids[:k + 1]) minus decode(prefix + ids[:k]), computed over a window of
  `context` earlier ids so that decoders that depend on the previous token (SentencePiece's leading
  space, byte-level merges) see it. An id that ends inside a multi-byte character (the decoded text ends
  with U+FFFD) gets the empty piece and its bytes go to the id that completes the character; after
  `max_pending` such ids (UTF-8 has at most 4 bytes) the replacement character is kept as text. The
  pieces concatenate to the text the ids decode to, for decoders where decoding is concatenative.
  """
  seq = [int(i) for i in prefix] + [int(i) for i in ids]
  done = len(prefix)  # seq[:done] is emitted
  pieces = []
  for k in range(len(prefix), len(seq)):
    low = max(0, done - context)
    before = decode(seq[low:done]) if done > low else ""
    after = decode(seq[low:k + 1])
    last = k + 1 == len(seq)
    pending = k + 1 - done
    if not last and pending < max_pending and (after.endswith(REPLACEMENT) or not after.startswith(before)):
      pieces.append("")  # wait for the rest of the character
      continue
    common = len(before) if after.startswith(before) else _common_prefix(before, after)
    pieces.append(after[common:])
    done = k + 1
  return pieces


def _common_prefix(a, b):
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def spans_of(pieces) -> np.ndarray:
  """int [n, 2]: the [start, end) character span of each piece in "".join(pieces)."""
  ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
  starts = ends - np.array([len(p) for p in pieces], dtype=np.int64)
  return np.stack([starts, ends], axis=1) if len(pieces) else np.zeros((0, 2), np.int64)


def _longest_encodable_prefix(encode, text):
  """(ids, m): `encode(text[:m])` for the largest m it does not refuse (binary search: a tokenizer with
  a fixed alphabet, like the built-in char one, refuses every text that holds an unknown character)."""
  try:
    return encode(text), len(text)
  except UserError:
    pass
  low, high = 0, len(text)  # text[:low] encodes, text[:high] does not
  while high - low > 1:
    mid = (low + high) // 2
    try:
      encode(text[:mid])
      low = mid
    except UserError:
      high = mid
  return encode(text[:low]) if low else [], low


def encode_with_spans(tokenizer, text):
  """(ids, spans [n, 2], valid bool [n]) of `text` under `tokenizer` (`encode` / `decode`).

  Spans come from decoding the ids back (`decode_pieces`), so they are where the tokenizer's own decoder
  puts each token. A token is valid while the decoded text agrees with `text` up to its end: text the
  tokenizer cannot encode (a character outside a fixed alphabet), an unknown-token id or a normalizer
  that changes the text end the valid part there (the model would read other text from that point on).
  """
  ids, encodable = _longest_encodable_prefix(tokenizer.encode, text)
  pieces = decode_pieces(tokenizer.decode, ids)
  spans = spans_of(pieces)
  decoded = "".join(pieces)
  agree = min(_common_prefix(decoded, text), encodable)
  valid = spans[:, 1] <= agree if len(ids) else np.zeros(0, bool)
  valid = np.logical_and.accumulate(valid) if len(ids) else valid
  return list(ids), spans, valid


def _cuts(spans):
  """{character position: number of tokens before the cut} for every place a side can be cut: after
  token k at max(end[:k + 1]) when no later token starts before it. The smallest count wins, so a token
  with an empty span (bytes of a character another token completes) joins the group that follows it."""
  cuts = {0: 0}
  n = len(spans)
  if not n:
    return cuts
  ends = np.maximum.accumulate(spans[:, 1])
  later_starts = np.minimum.accumulate(spans[::-1, 0])[::-1]  # min start of tokens k.. n-1
  for k in range(n):
    if k + 1 == n or ends[k] <= later_starts[k + 1]:
      cuts.setdefault(int(ends[k]), k + 1)
  return cuts


def _covers(spans, low, high):
  """Whether the spans (in order) cover [low, high) without a gap."""
  reach = low
  for start, end in spans:
    if start > reach:
      return False
    reach = max(reach, end)
  return reach >= high


def align(a_spans, b_spans, *, a_valid=None, b_valid=None):
  """(a_group int [na], b_group int [nb], groups): the aligned span group of every token, -1 if none.

  Groups are the texts between consecutive character positions where both tokenizations cut, numbered
  0, 1, ... from the left; each holds at least one token of each side, and the union of each side's
  spans covers exactly the group's text. From the first group that fails that (a side's tokens leave a
  gap, or a token is not valid: `encode_with_spans`) on, nothing is aligned: both models read different
  text from there.
  """
  a_spans = np.asarray(a_spans, np.int64).reshape(-1, 2)
  b_spans = np.asarray(b_spans, np.int64).reshape(-1, 2)
  a_valid = np.ones(len(a_spans), bool) if a_valid is None else np.asarray(a_valid, bool)
  b_valid = np.ones(len(b_spans), bool) if b_valid is None else np.asarray(b_valid, bool)
  a_group = np.full(len(a_spans), -1, np.int64)
  b_group = np.full(len(b_spans), -1, np.int64)
  a_cuts, b_cuts = _cuts(a_spans), _cuts(b_spans)
  previous, a_done, b_done, groups = 0, 0, 0, 0
  for position in sorted(set(a_cuts) & set(b_cuts)):
    a_end, b_end = a_cuts[position], b_cuts[position]
    if position == 0:
      continue
    a_range, b_range = slice(a_done, a_end), slice(b_done, b_end)
    ok = (a_end > a_done and b_end > b_done and a_valid[a_range].all() and b_valid[b_range].all()
          and _covers(a_spans[a_range], previous, position) and _covers(b_spans[b_range], previous, position))
    if not ok:
      break
    a_group[a_range] = groups
    b_group[b_range] = groups
    groups += 1
    previous, a_done, b_done = position, a_end, b_end
  return a_group, b_group, groups
