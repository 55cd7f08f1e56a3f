"""Cleaning filters: exact dedup, near-dup removal (MinHash + LSH), token-length limits, decontamination.

Each filter takes a `datasets.Dataset` of normalised records (with the bookkeeping columns `_origin`, `_source`, and
`_text`, `_key` and `_group` from `add_text`) and returns `(kept, removed)`, where `removed` has a `_reason` column: rows are never dropped silently, the
build job writes `removed` to `rejects.jsonl` and counts it in the data card. The per-row work (hashing, shingling,
tokenizing, n-gram lookups) runs in `Dataset.map(batched=True, num_proc=...)`; only the order-dependent decisions
(which copy came first) are a sequential pass over a column of hashes.
"""

import functools
import hashlib
import json
import re
import sys
import unicodedata

import numpy as np
import xxhash

from posttrain.answers import CJK_LETTERS
from posttrain.data import called, template_kwargs

from .messages import text_of

# Ideographs, kana and hangul (`CJK_LETTERS`): each of their characters is a token (as \w+ runs, a whole Chinese
# clause would be one "word" and a copied eval question shorter than one n-gram). The lookahead keeps their
# punctuation (the katakana middle dot) out of the words. ASCII text, most of it, takes the plain patterns, ~1.7x
# faster than a class of these ranges.
_WORD, _WORD_CJK = re.compile(r"\w+"), re.compile(rf"[^\W{CJK_LETTERS}]+|(?=\w)[{CJK_LETTERS}]")
_TOKEN = re.compile(r"\w+|[^\w\s]")
_TOKEN_CJK = re.compile(rf"[^\W{CJK_LETTERS}]+|(?=\w)[{CJK_LETTERS}]|[^\w\s]")
_PRIME = np.uint64(1_099_511_628_211)  # FNV-1a's 64-bit prime: an odd multiplier that mixes well mod 2**64


@functools.cache
def _format_characters() -> dict[int, None]:
    """Unicode's format characters (category Cf: soft hyphens, zero-width spaces and joiners, bidi marks, BOMs) as a
    `str.translate` table that deletes them; built once per process (~0.1 s)."""
    return dict.fromkeys(c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf")


def normalise(text: str) -> str:
    """The text dedup compares: Unicode NFKC, lower case, runs of whitespace as one space, and no format characters:
    they are invisible, and a soft hyphen or zero-width space copied from a web page would split a word in two."""
    if not text.isascii():
        text = text.translate(_format_characters())
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def words(text: str) -> list[str]:
    """Word tokens of the normalised text, punctuation dropped, each ideograph, kana or hangul letter a word of its
    own: the unit of decontamination n-grams."""
    text = normalise(text)
    return (_WORD if text.isascii() else _WORD_CJK).findall(text)


def tokens(text: str) -> list[str]:
    """Words (as in `words`) and punctuation marks: the unit of near-dup shingles (`[1, 2]` and `"1, 2"` are
    different answers)."""
    text = normalise(text)
    return (_TOKEN if text.isascii() else _TOKEN_CJK).findall(text)


def _messages_text(messages) -> list[str]:
    out = []
    for message in messages or []:
        out.append(f"{message['role']}: {text_of(message.get('content'))}")
        if message.get("tool_calls"):
            out.append(json.dumps(called(message["tool_calls"]), sort_keys=True, ensure_ascii=False))
    return out


def record_text(row: dict) -> str:
    """All the text of a record (every turn, both replies of a pair, the answer): what dedup and decontam look at."""
    parts = []
    for key in ("messages", "prompt", "chosen", "rejected", "completion"):
        value = row.get(key)
        parts += [value] if isinstance(value, str) else _messages_text(value)
    if row.get("answer") is not None:
        parts.append(f"answer: {row['answer']}")
    return "\n".join(parts)


def _image_id(image) -> str:
    return image if isinstance(image, str) else hashlib.sha256(image["bytes"]).hexdigest()


def context_key(row: dict) -> str:
    """What besides its text makes a row a different example: its tools and images (a path, or the sha256 of
    embedded bytes). VQA-style data asks the same question of many images. Empty for a row of text alone."""
    tools, images = row.get("tools"), [_image_id(image) for image in row.get("images") or []]
    return json.dumps([tools, images], sort_keys=True, ensure_ascii=False) if tools or images else ""


def prompt_text(row: dict) -> str:
    """The text of a row's prompt: `prompt`, or the turns of `messages` up to the last user turn."""
    if row.get("prompt") is not None:
        return record_text({"prompt": row["prompt"]})
    messages = row["messages"]
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    return record_text({"messages": messages[:last_user + 1]})


def exchange_keys(row: dict, context: str) -> list[str]:
    """A hash of each exchange a conversation (`messages`, SFT) trains, with the row's context: its turns up to each
    assistant turn, normalised. A row that holds another's whole conversation as its first turns shares its keys."""
    digest, keys = hashlib.blake2b(digest_size=16), []
    for message in row.get("messages") or []:
        digest.update((normalise(record_text({"messages": [message]})) + "\n").encode())  # hashed once per turn
        if message["role"] == "assistant":
            key = digest.copy()
            key.update(context.encode())
            keys.append(key.hexdigest())
    return keys


def _rows(batch: dict) -> list[dict]:
    return [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def _text_batch(batch: dict) -> dict:
    rows = _rows(batch)
    context = [context_key(r) for r in rows]
    # Dedup keys add the KTO label: the same reply marked desirable and undesirable is two examples (or a conflict);
    # and the thinking mode: an RL prompt asked in both modes is rendered two ways (its mode is in no text).
    labels = [(f"\nlabel: {r['label']}" if "label" in r else "")
              + (f"\nthinking: {r['thinking']}" if r.get("thinking") is not None else "") for r in rows]
    prompts = [normalise(prompt_text(r)) + "\n" + c for r, c in zip(rows, context)]
    out = {"_text": [record_text(r) for r in rows], "_key": [c + label for c, label in zip(context, labels)],
           "_group": [[hashlib.blake2b(p.encode(), digest_size=16).hexdigest(), *exchange_keys(r, c)]
                      for p, r, c in zip(prompts, rows, context)]}
    for part in near_dup_parts(batch):
        out[f"_text_{part}"] = [record_text({part: r[part]}) for r in rows]
    return out


def add_text(dataset, num_proc: int | None):
    """Add `_text` (see `record_text`: what decontamination reads), `_key` (see `context_key`, with the KTO label:
    rows with the same text and another `_key` are not duplicates), `_group` (hashes of the normalised prompt and of
    each trained exchange, see `exchange_keys`, with the context: rows that share one stay on one side of the held-out
    split) and, for pairs and unpaired rows, the text of each part that near-dup compares (see `near_dup_columns`)."""
    return dataset.map(_text_batch, batched=True, num_proc=num_proc, desc="Collecting text")


def near_dup_parts(columns) -> tuple[str, ...]:
    """The parts near-dup compares apart: pairs' prompt and replies, unpaired rows' prompt and completion."""
    if "chosen" in columns:
        return "prompt", "chosen", "rejected"
    return ("prompt", "completion") if "completion" in columns else ()


def near_dup_columns(dataset) -> tuple[str, ...]:
    """What near-dup compares: the whole text, or for pairs (unpaired rows) the prompt and each reply (the completion)
    apart. One prompt often comes with several pairs that share a reply, or with a desirable and an undesirable
    completion; they are distinct training signal, and the prompt would dominate a whole-text comparison."""
    parts = near_dup_parts(dataset.column_names)
    return tuple(f"_text_{part}" for part in parts) if parts else ("_text",)


def column(dataset, name: str) -> list:
    """A column as a list, converted from Arrow in one go: iterating or indexing `dataset[name]` reads the table again
    for each row (~40 us a row: most of a 100k-row build's time, outside near-dup)."""
    return dataset[name][:]


def _split(dataset, keep: list[int], reasons: dict[int, str]):
    """`(kept, removed)` for the indices in `keep`; `removed` carries each row's `_reason`."""
    removed_idx = sorted(reasons)
    removed = dataset.select(removed_idx)
    if removed_idx:  # datasets cannot add a column to an empty selection of a table that `map(num_proc=2+)` made
        removed = removed.add_column("_reason", [reasons[i] for i in removed_idx])
    return dataset.select(keep), removed


def exact_dedup(dataset, num_proc: int | None = None):
    """Keep the first of rows whose normalised text and `_key` (tools, images, label, thinking mode) are identical."""
    def hash_batch(texts, keys):
        rows = (f"{normalise(t)}\0{k}" for t, k in zip(texts, keys))
        return {"_hash": [hashlib.blake2b(row.encode(), digest_size=16).hexdigest() for row in rows]}

    hashes = dataset.map(hash_batch, batched=True, input_columns=["_text", "_key"], num_proc=num_proc,
                         remove_columns=dataset.column_names, desc="Exact dedup")["_hash"]
    origins, first, keep, reasons = column(dataset, "_origin"), {}, [], {}
    for i, digest in enumerate(hashes):
        if digest in first:
            reasons[i] = f"exact duplicate of {origins[first[digest]]}"
        else:
            first[digest] = i
            keep.append(i)
    return _split(dataset, keep, reasons)


def token_hashes(items: list[str]) -> np.ndarray:
    """A 64-bit hash of each token (xxh64: stable across processes, unlike Python's `hash`)."""
    return np.fromiter((xxhash.xxh64_intdigest(t.encode()) for t in items), dtype=np.uint64, count=len(items))


def window_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit hash of every run of `n` consecutive words (polynomial rolling hash, vectorised; wraps mod 2**64)."""
    if len(hashes) < n:
        return np.empty(0, dtype=np.uint64)
    out = hashes[: len(hashes) - n + 1].copy()
    for k in range(1, n):
        out = out * _PRIME + hashes[k:k + len(out)]
    return out


def _minhash_batch(texts: list[str], ngram: int, num_perm: int) -> dict:
    from datasketch import MinHash

    shingles = []
    for text in texts:
        hashes = token_hashes(tokens(text))
        # A text shorter than one shingle is one shingle: short rows still dedup against their copies.
        grams = window_hashes(hashes, min(ngram, max(1, len(hashes)))) if len(hashes) else np.zeros(1, np.uint64)
        shingles.append((grams >> np.uint64(32)).tolist())
    # Shingles arrive already hashed (top 32 bits, the width of datasketch's affine32 scheme), so hashfunc is `int`:
    # hashing the words once with numpy is ~3x faster than datasketch hashing every shingle string with sha1.
    signatures = MinHash.bulk(shingles, num_perm=num_perm, hashfunc=int)
    return {"_minhash": [m.hashvalues for m in signatures]}


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """LSH bands and rows per band that make a pair of similarity `threshold` a candidate 99% of the time.

    Candidates are checked on their signatures, so a false candidate costs a comparison, a missed one a duplicate
    kept: datasketch's balanced default (8 bands of 16 at 0.85) misses ~20% of pairs at Jaccard 0.9."""
    for rows in range(num_perm // 2, 0, -1):
        if (1 - threshold ** rows) ** (num_perm // rows) <= 0.01:
            return num_perm // rows, rows
    return num_perm, 1


def near_dedup(dataset, threshold: float, ngram: int = 5, num_perm: int = 128, num_proc: int | None = None,
               columns: tuple[str, ...] = ("_text",)):
    """Drop rows whose estimated Jaccard similarity to an earlier kept row with the same `_key` (tools, images,
    label) is >= `threshold` in every one of `columns`.

    MinHash signatures of `ngram`-token shingles; LSH on the first column finds candidate pairs in ~O(n), and a
    candidate counts only if the signatures themselves agree on >= `threshold` of their permutations, column by column
    (LSH bands alone over-report).
    """
    from datasketch import LeanMinHash, MinHashLSH

    signatures = []
    for column in columns:
        sig = dataset.map(_minhash_batch, batched=True, input_columns=[column], num_proc=num_proc,
                          fn_kwargs={"ngram": ngram, "num_perm": num_perm}, remove_columns=dataset.column_names,
                          desc=f"MinHash {column}").with_format("numpy")["_minhash"]
        signatures.append(np.asarray(sig[:], dtype=np.uint32).reshape(len(dataset), num_perm))
    lsh = MinHashLSH(num_perm=num_perm, params=lsh_bands(threshold, num_perm))
    # Lists, not `Column`s: a Column reads the table again at each index (~0.1 ms), and rows alike in most of their
    # text (one long system prompt) make thousands of candidates per row.
    origins, keys, keep, reasons = dataset["_origin"][:], dataset["_key"][:], [], {}
    for i, hashvalues in enumerate(signatures[0]):
        minhash = LeanMinHash(seed=1, hashvalues=hashvalues, scheme="affine32")
        candidates = np.array([j for j in lsh.query(minhash) if keys[j] == keys[i]], dtype=np.int64)
        # every candidate's agreement at once, the lowest over the columns
        scores = np.min([np.mean(s[candidates] == s[i], axis=1) for s in signatures], axis=0)
        if len(candidates) and scores.max() >= threshold:
            score = scores.max()
            j = candidates[scores == score].max()
            reasons[i] = f"near-duplicate (Jaccard ~{score:.2f}) of {origins[j]}"
        else:
            lsh.insert(i, minhash)
            keep.append(i)
    return _split(dataset, keep, reasons)


def eval_ngrams(texts_by_set: dict[str, list[str]], n: int) -> dict:
    """An index of every word `n`-gram of the evaluation texts: sorted 64-bit hashes and the set each came from."""
    hashes, owners = [np.empty(0, np.uint64)], [np.empty(0, np.int64)]
    for index, texts in enumerate(texts_by_set.values()):
        for text in texts:
            grams = window_hashes(token_hashes(words(text)), n)
            hashes.append(grams)
            owners.append(np.full(len(grams), index))
    hashes, owners = np.concatenate(hashes), np.concatenate(owners)
    order = np.argsort(hashes)
    return {"hashes": hashes[order], "owners": owners[order], "names": list(texts_by_set)}


def _contamination_batch(texts: list[str], index: dict, n: int) -> dict:
    table, found = index["hashes"], []
    for text in texts:
        tokens = words(text)
        grams = window_hashes(token_hashes(tokens), n)
        slots = np.minimum(np.searchsorted(table, grams), len(table) - 1)
        hits = np.flatnonzero(table[slots] == grams)
        if len(hits):
            name = index["names"][index["owners"][slots[hits[0]]]]
            found.append(f"shares the {n}-gram \"{' '.join(tokens[hits[0]:hits[0] + n])}\" with eval set '{name}'")
        else:
            found.append("")
    return {"_contam": found}


def decontaminate(dataset, index: dict, n: int, num_proc: int | None = None):
    """Drop rows that share any word `n`-gram with the evaluation sets of `index` (see `eval_ngrams`).

    N-grams are compared by 64-bit hash: with millions of n-grams on each side a false match has odds ~1e-7.
    """
    if not len(index["hashes"]):
        return dataset, dataset.select([]).add_column("_reason", [])
    hits = dataset.map(_contamination_batch, batched=True, input_columns=["_text"], num_proc=num_proc,
                       fn_kwargs={"index": index, "n": n}, remove_columns=dataset.column_names,
                       desc="Decontaminating")["_contam"]
    reasons = {i: hit for i, hit in enumerate(hits) if hit}
    return _split(dataset, [i for i in range(len(dataset)) if i not in reasons], reasons)


# ----------------------------------------------------------------------------------------------------------------------
# Lengths
# ----------------------------------------------------------------------------------------------------------------------
def _render(tokenizer, row: dict) -> list[str]:
    """The text(s) the trainer will see: the chat template of each full conversation in the row's thinking mode (a
    non-thinking reply gets the template's empty think block, as the stages render it), plain text without one."""
    if row.get("messages") is not None:
        conversations = [row["messages"]]
    elif row.get("chosen") is not None:
        conversations = [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]
    else:
        conversations = [row["prompt"] + (row.get("completion") or [])]
    texts = []
    for conversation in conversations:
        try:
            texts.append(tokenizer.apply_chat_template(
                conversation, tokenize=False, **template_kwargs(row.get("thinking"), {"tools": row.get("tools")})))
        except Exception:  # no template, or one that cannot render tool turns: count the plain text instead
            texts.append("\n".join(_messages_text(conversation)))
    return texts


def _length_batch(batch: dict, tokenizer) -> dict:
    if tokenizer is None:  # `words`, not whitespace: a Chinese reply is hundreds of words, and had the length of one
        return {"_length": [len(words(t)) for t in batch["_text"]]}
    rendered = [_render(tokenizer, row) for row in _rows(batch)]
    flat = [text for texts in rendered for text in texts]
    counts = iter(len(ids) for ids in tokenizer(flat, add_special_tokens=False)["input_ids"])
    return {"_length": [max(next(counts) for _ in texts) for texts in rendered]}


def add_lengths(dataset, tokenizer=None, num_proc: int | None = None):
    """Add `_length`: tokens of the longest rendered conversation of each row, or without a tokenizer the `words` of
    its text (each ideograph, kana or hangul letter one)."""
    return dataset.map(_length_batch, batched=True, fn_kwargs={"tokenizer": tokenizer}, num_proc=num_proc,
                       desc="Measuring lengths")


def length_filter(dataset, min_tokens: int | None, max_tokens: int | None):
    """Drop rows outside `[min_tokens, max_tokens]` of the `_length` column."""
    lengths, keep, reasons = column(dataset, "_length"), [], {}
    for i, length in enumerate(lengths):
        if min_tokens is not None and length < min_tokens:
            reasons[i] = f"{length} tokens < min_tokens {min_tokens}"
        elif max_tokens is not None and length > max_tokens:
            reasons[i] = f"{length} tokens > max_tokens {max_tokens}"  # a data limit, which may sit below max_length
        else:
            keep.append(i)
    return _split(dataset, keep, reasons)
