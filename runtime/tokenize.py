"""Tokenization with the `tokenizers` library only, so a deployment box needs no transformers."""
from __future__ import annotations

import json
import threading
from collections.abc import Sequence

import numpy as np
from tokenizers import Encoding, Tokenizer

from .errors import BitFitError, CompiledModelError
from .fs import MAX_TOKENIZER_BYTES, read_bounded

# runtime.compiled's words (importing them would be a cycle: compiled -> pack -> kinds -> decode -> here)
_FIX = "the compiled directory is damaged or was edited by hand; compile it again (bitfit compile)"


def load_tokenizer_json(path: str, error: type[BitFitError] = CompiledModelError) -> str:
    """The JSON of a tokenizer file that loads and encodes, or `error` naming the file: a truncated, edited
    or replaced tokenizer.json makes the `tokenizers` library raise bare Exceptions, or panic (a Rust panic
    is a BaseException), which must not reach the user as a traceback."""
    raw = read_bounded(path, MAX_TOKENIZER_BYTES, what="tokenizer", error=error, fix=_FIX)
    try:
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
        tokenizer.encode("a")  # loads but cannot encode is as broken as not loading (its template may panic)
        tokenizer.encode("a", "b")
        return tokenizer.to_str()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - tokenizers' errors are untyped (and panics are BaseException)
        reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise error(f"{path} is not a tokenizer the tokenizers library can load ({reason}): {_FIX}") from None


class TextEncoder:
    """Turns texts (and optional second texts) into the graph's int64 token inputs, padded per batch."""

    def __init__(self, tokenizer_file: str, *, pad_token: str, pad_token_id: int, token_inputs: Sequence[str]):
        self._json = load_tokenizer_json(str(tokenizer_file))
        self._pad = (pad_token, pad_token_id)
        self._token_inputs = tuple(token_inputs)
        self._by_length: dict[tuple[int, str, int], Tokenizer] = {}
        self._lock = threading.Lock()
        self._plain = Tokenizer.from_str(self._json)  # no truncation, no padding: for counting tokens
        self._plain.no_truncation()
        self._plain.no_padding()
        self._unknown = _unknown_token(self._json, self._plain)

    def special_tokens(self, pair: bool) -> int:
        """How many special tokens the tokenizer adds to one text, or to a pair of texts."""
        return self._plain.num_special_tokens_to_add(pair)

    def _tokenizer(self, max_length: int, strategy: str = "longest_first", stride: int = 0) -> Tokenizer:
        # Truncation is tokenizer state: one configured copy per setting keeps concurrent callers apart.
        with self._lock:
            tok = self._by_length.get((max_length, strategy, stride))
            if tok is None:
                tok = Tokenizer.from_str(self._json)
                tok.enable_truncation(max_length, strategy=strategy, stride=stride)
                tok.enable_padding(pad_id=self._pad[1], pad_token=self._pad[0])
                self._by_length[max_length, strategy, stride] = tok
            return tok

    def windows(
        self, pairs: Sequence[tuple[str, str]], *, max_length: int, stride: int, first: int = 0
    ) -> tuple[dict[str, np.ndarray], list[Encoding], list[int]]:
        """Extractive QA over long contexts: each (question, context) as overlapping windows of at most
        `max_length` tokens, the whole question in every window and `stride` context tokens shared by
        neighbouring windows (fewer where a long question leaves less room: at most half of it). Returns
        the token inputs of all windows (padded to the longest), their encodings (offsets index the
        context) and, per window, the index of its pair (`first`: the caller's index of pairs[0], for messages)."""
        specials = self._plain.num_special_tokens_to_add(True)
        questions = self._plain.encode_batch([q for q, _ in pairs], add_special_tokens=False)
        strides = []
        for i, question in enumerate(questions):
            room = max_length - specials - len(question.ids)
            if room < 1:
                raise BitFitError(f"questions[{first + i}] leaves no room for its context within max_length {max_length}: "
                                  "shorten the question")
            # tokenizers panics (an uncatchable Rust error) when the stride is not below the room left
            strides.append(min(stride, (room - 1) // 2))
        windows: list[tuple[int, Encoding]] = []
        for s in sorted(set(strides)):
            index = [i for i, t in enumerate(strides) if t == s]
            encoded = self._encode([pairs[i] for i in index], max_length, "only_second", s,
                                   names=("questions", "contexts"), index=[first + i for i in index])
            for i, e in zip(index, encoded):
                windows += [(i, w) for w in (e, *e.overflowing)]
        windows.sort(key=lambda item: item[0])  # stable: a pair's windows stay in context order
        width = max(len(w.ids) for _, w in windows)

        def padded(rows: list[list[int]], value: int) -> np.ndarray:
            return np.array([r + [value] * (width - len(r)) for r in rows], dtype=np.int64)

        encodings = [w for _, w in windows]
        arrays = {
            "input_ids": padded([w.ids for w in encodings], self._pad[1]),
            "attention_mask": padded([w.attention_mask for w in encodings], 0),
            "token_type_ids": padded([w.type_ids for w in encodings], 0),
        }
        return {k: arrays[k] for k in self._token_inputs}, encodings, [i for i, _ in windows]

    def _encode(self, batch: list, max_length: int, strategy: str, stride: int = 0, pretokenized: bool = False,
                names: tuple[str, str] = ("texts", "text_pairs"), index: Sequence[int] | None = None) -> list[Encoding]:
        """Encode, and refuse a row with a text that gives no token of its own, or only the unknown token (names
        and index: how the caller calls the texts and their positions, for the message)."""
        try:
            encodings = self._tokenizer(max_length, strategy, stride).encode_batch(batch, is_pretokenized=pretokenized)
        except Exception as e:  # tokenizers raises plain Exceptions
            if "truncat" in str(e).lower():
                raise BitFitError(
                    f"cannot fit a row into max_length {max_length} by truncating only the second text ({e}): "
                    "shorten the question (the first text)"
                ) from e
            raise BitFitError(f"cannot tokenize the input ({e})") from e
        for row, enc in enumerate(encodings):
            pair = not pretokenized and isinstance(batch[row], tuple)
            for segment in (0, 1) if pair else (0,):
                unknown = self._unknown[1] if self._unknown is not None else None
                # the common case costs one token: a real token right after [CLS] ends the search
                if _has_token(enc, segment, unknown) or any(_has_token(w, segment, unknown) for w in enc.overflowing):
                    continue  # (a long context's later windows count too)
                at = index[row] if index is not None else row
                if unknown is None or not any(_has_token(w, segment, None) for w in (enc, *enc.overflowing)):
                    raise BitFitError(f"{names[segment]}[{at}] gives no token (empty after tokenization: only "
                                      "invisible or control characters?): give some text")
                # the model would read nothing but "unknown" and still answer with confidence
                raise BitFitError(f"{names[segment]}[{at}] gives only the unknown token {self._unknown[0]} (none "
                                  "of its characters is in the tokenizer's vocabulary, as for a script or emoji "
                                  "the model was not trained on): the answer would mean nothing; give text in "
                                  "a language the model knows")
        return encodings

    def encodings(
        self,
        batch: Sequence[str | tuple[str, str] | Sequence[str]],
        *,
        max_length: int,
        pretokenized: bool = False,
        strategy: str = "longest_first",
        names: tuple[str, str] = ("texts", "text_pairs"),
        index: Sequence[int] | None = None,
    ) -> tuple[dict[str, np.ndarray], list[Encoding]]:
        """Token inputs plus each row's `tokenizers.Encoding` (word_ids, offsets, sequence_ids), which token
        tasks need to map tokens back to words and characters. Rows: texts, (text, pair) tuples, or with
        pretokenized=True lists of words. strategy="only_second" truncates only the pair (QA contexts)."""
        encodings = self._encode(list(batch), max_length, strategy, pretokenized=pretokenized, names=names, index=index)
        arrays = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        return {k: arrays[k] for k in self._token_inputs}, encodings

    def __call__(
        self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, *, max_length: int,
        index: Sequence[int] | None = None,
    ) -> dict[str, np.ndarray]:
        check_texts(texts, "texts")
        if text_pairs is not None:
            check_texts(text_pairs, "text_pairs")
            if len(text_pairs) != len(texts):
                raise BitFitError(f"text_pairs has {len(text_pairs)} items but texts has {len(texts)}: give one pair "
                                  "per text")
            batch = list(zip(texts, text_pairs))
        else:
            batch = list(texts)
        return self.encodings(batch, max_length=max_length, index=index)[0]

    def encode_rows(
        self, texts: Sequence[str], text_pairs: Sequence[str | None], max_lengths: Sequence[int]
    ) -> dict[str, np.ndarray]:
        """Rows truncated each to its own max_length (rows of different tasks), padded to the longest."""
        check_texts(texts, "texts")
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, (length, pair) in enumerate(zip(max_lengths, text_pairs)):
            groups.setdefault((length, pair is not None), []).append(i)
        parts = []
        for (length, has_pair), index in groups.items():
            pairs = [text_pairs[i] for i in index] if has_pair else None
            parts.append((index, self([texts[i] for i in index], pairs, max_length=length, index=index)))
        width = max(encoded["input_ids"].shape[1] for _, encoded in parts)
        out = {k: np.zeros((len(texts), width), np.int64) for k in self._token_inputs}
        out["input_ids"][:] = self._pad[1]
        for index, encoded in parts:
            for k, v in encoded.items():
                out[k][index, : v.shape[1]] = v
        return out


def _has_token(enc: Encoding, segment: int, unknown: int | None) -> bool:
    """Whether `enc` holds a token of text `segment` that is not special (nor, given its id, the unknown one)."""
    return any(m == 0 and sid == segment and i != unknown
               for i, m, sid in zip(enc.ids, enc.special_tokens_mask, enc.sequence_ids))


def _unknown_token(tokenizer_json: str, tokenizer: Tokenizer) -> tuple[str, int] | None:
    """The tokenizer's unknown token and its id (WordPiece and BPE name it, Unigram gives its id); None when it
    has none (byte-level BPE, which can spell any text)."""
    model = json.loads(tokenizer_json).get("model") or {}
    unk_id = model.get("unk_id")
    if isinstance(unk_id, int) and not isinstance(unk_id, bool):
        token = tokenizer.id_to_token(unk_id)
        return None if token is None else (token, unk_id)
    token = model.get("unk_token")
    unk_id = tokenizer.token_to_id(token) if isinstance(token, str) else None
    return None if unk_id is None else (token, unk_id)


def check_texts(texts: object, what: str) -> None:
    """A non-empty list of strings, none of them blank: what every call that takes texts accepts."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise BitFitError(f"{what} must be a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise BitFitError(f"{what} is empty: give at least one text")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise BitFitError(f"{what}[{i}] is {type(t).__name__}, not a string")
        if not t.strip():
            raise BitFitError(f"{what}[{i}] is empty: give some text")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: JSON can carry one, UTF-8 and the tokenizer cannot
            raise BitFitError(f"{what}[{i}] is not valid Unicode ({t[e.start]!r} at character {e.start} is a lone "
                              "surrogate): send UTF-8 text") from None
