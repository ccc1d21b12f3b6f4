"""Tokenizers for the stream: a Hugging Face tokenizer by name or folder, or ByT5's byte tokenizer.

``transformers.ByT5Tokenizer`` is pure Python and spends ~120 us per string (most of it rebuilding
its special-token list), which alone would cap a 2-core stream near 8,000 samples/s. Its rule is
simple and fixed: token id = UTF-8 byte + 3 (0 = pad, 1 = EOS, 2 = unk), EOS appended. So for the
spec ``byt5`` the stream uses :class:`ByteTokenizer`, which applies that rule with numpy and is
checked against ``ByT5Tokenizer`` in ``tests/test_stream.py``. (Difference: ``ByT5Tokenizer``
turns the literal text ``</s>``, ``<pad>``, ``<unk>`` into one special token; here they stay bytes.)
Any other spec loads ``transformers.AutoTokenizer`` (the Rust "fast" tokenizers are quick enough).

Both cut a text to :func:`char_limit` characters before tokenizing (:func:`cut_text`): the tokens
kept are the same, and a 10 MB question no longer costs the word tokenizer 10 s per batch.
"""

import numpy as np
import torch

from ..errors import PipelineError

BYT5_OFFSET = 3
BYT5_PAD, BYT5_EOS = 0, 1

# Characters of a text kept per token of the limit, plus a margin. A token spans at least one
# character for bytes (one token per UTF-8 byte, one to four bytes per character) and a few for a
# word or subword vocabulary (T5's SentencePiece: about 4 on English), so the first ``max_length``
# tokens of the cut text are those of the whole text; they could differ only for a text whose first
# ``max_length`` tokens average more than 8 characters (e.g. out-of-vocabulary words of dozens of
# characters, each one unknown token).
CHARS_PER_TOKEN = 8
CHAR_MARGIN = 1024


def char_limit(max_length: int) -> int:
    """Characters of a text that hold its first ``max_length`` tokens (2,048 for 128 tokens)."""
    return CHARS_PER_TOKEN * max_length + CHAR_MARGIN


def cut_text(text: str, max_length: int) -> str:
    """``text`` cut to :func:`char_limit` characters: tokenized and truncated to ``max_length`` tokens,
    it gives the tokens of the whole text, at a cost bounded whatever the text's length."""
    limit = char_limit(max_length)
    return text if len(text) <= limit else text[:limit]


class ByteTokenizer:
    """ByT5's tokenization (``transformers.ByT5Tokenizer``), vectorised."""

    pad_token_id = BYT5_PAD
    eos_token_id = BYT5_EOS
    vocab_size = 384  # ByT5's embedding rows: 3 specials, 256 bytes, 125 sentinels

    def encode_batch(self, texts, max_length: int):
        """``(input_ids, attention_mask)``, int64 (B, L): right padded, truncated to ``max_length``
        tokens with EOS kept last (as ``ByT5Tokenizer(..., truncation=True)``)."""
        encoded = [cut_text(t, max_length).encode("utf-8")[: max_length - 1] for t in texts]
        lens = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
        n, length = len(encoded), int(lens.max(initial=0)) + 1
        ids = np.zeros((n, length), dtype=np.int64)  # BYT5_PAD
        rows = np.repeat(np.arange(n), lens)
        cols = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        ids[rows, cols] = np.frombuffer(b"".join(encoded), dtype=np.uint8) + BYT5_OFFSET
        ids[np.arange(n), lens] = BYT5_EOS
        mask = (np.arange(length)[None, :] <= lens[:, None]).astype(np.int64)  # bytes and EOS
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def decode_batch(self, ids) -> list:
        """Texts of generated ids (B, T): bytes up to the first EOS, special tokens dropped."""
        out = []
        for row in ids.tolist():
            row = row[: row.index(BYT5_EOS)] if BYT5_EOS in row else row
            out.append(bytes(t - BYT5_OFFSET for t in row if BYT5_OFFSET <= t < 256 + BYT5_OFFSET)
                       .decode("utf-8", errors="ignore"))
        return out


class HFTokenizer:
    """A Hugging Face tokenizer behind the same ``encode_batch`` interface."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)

    def encode_batch(self, texts, max_length: int):
        out = self.tokenizer([cut_text(t, max_length) for t in texts], padding=True, truncation=True,
                             max_length=max_length, return_tensors="pt")
        return out["input_ids"].long(), out["attention_mask"].long()

    def decode_batch(self, ids) -> list:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)


def decode_batch(tokenizer, ids) -> list:
    """Generated token ids (B, T) -> B answer strings, stripped."""
    return [text.strip() for text in tokenizer.decode_batch(ids)]


WORD_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2: T5's pad (= decoder start), EOS and unknown


def build_word_tokenizer(texts, out) -> int:
    """A word-level Hugging Face tokenizer of ``texts`` saved to the folder ``out``.

    For small closed vocabularies such as the synthetic shapes data: a question is ~10 tokens
    instead of ~50 bytes, and an answer one token, which makes the demo T5 several times cheaper
    per step. Lower-cased, split on whitespace and punctuation, EOS appended, ids 0/1/2 as T5's
    pad/EOS/unk. Loads with ``load_tokenizer(out)`` (``transformers.AutoTokenizer``).

    Returns:
        The vocabulary size.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in {t.lower() for t in texts} for w, _ in pre.pre_tokenize_str(t)})  # each text once
    vocab = {w: i for i, w in enumerate([*WORD_SPECIALS, *[w for w in words if w not in WORD_SPECIALS]])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(out))
    return len(vocab)


def load_tokenizer(spec: str):
    """``byt5`` -> :class:`ByteTokenizer`; ``hf:byt5`` -> ``transformers.ByT5Tokenizer()`` itself;
    anything else -> ``transformers.AutoTokenizer.from_pretrained(spec)`` (a name or a folder)."""
    if spec == "byt5":
        return ByteTokenizer()
    import transformers

    try:
        if spec == "hf:byt5":
            return HFTokenizer(transformers.ByT5Tokenizer())
        return HFTokenizer(transformers.AutoTokenizer.from_pretrained(spec))
    except (OSError, ValueError) as e:
        raise PipelineError(f"--tokenizer {spec}: cannot load it ({e})") from None
