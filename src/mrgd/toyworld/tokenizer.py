"""Build a small CLIP-format tokenizer offline from CLIP's own BPE merges.

We keep only the merges that the shapes-world vocabulary uses (plus the 512 byte symbols and the two
specials). BPE always applies the lowest-ranked available merge, and every merge a world word needs is
kept in its original order, so world words tokenize exactly as OpenAI CLIP tokenizes them; any other
word falls back to byte pieces. The result is a standard `CLIPTokenizer` folder.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from .world import vocabulary_text


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's (and GPT-2's) reversible byte -> printable character table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def find_clip_bpe() -> Path:
    """CLIP's merges file as shipped by open_clip_torch or clip-anytorch (found without importing them)."""
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)
        if spec and spec.submodule_search_locations:
            for folder in spec.submodule_search_locations:
                path = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
                if path.exists():
                    return path
    raise FileNotFoundError("CLIP's bpe_simple_vocab_16e6.txt.gz not found: pip install --no-deps open_clip_torch")


def _apply_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """Run CLIP's BPE on one pre-tokenized word; return the merges applied, in order."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    used = []
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pair = (symbols[i], symbols[i + 1])
        used.append(pair)
        merged, j = [], 0
        while j < len(symbols):  # merge every occurrence, as CLIP does
            if j < len(symbols) - 1 and (symbols[j], symbols[j + 1]) == pair:
                merged.append(symbols[j] + symbols[j + 1])
                j += 2
            else:
                merged.append(symbols[j])
                j += 1
        symbols = merged
    return used


def build_tokenizer(out_dir: str | Path, extra_words: list[str] | None = None) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs of a world-sized CLIP tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(find_clip_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    all_merges = [tuple(line.split()) for line in lines]
    ranks = {m: i for i, m in enumerate(all_merges)}
    byte_encoder = _bytes_to_unicode()
    needed: set[tuple[str, str]] = set()
    for word in vocabulary_text() + (extra_words or []):
        for piece in word.lower().split():
            encoded = "".join(byte_encoder[b] for b in piece.encode("utf-8"))
            needed.update(_apply_bpe(encoded, ranks))
    kept = [m for m in all_merges if m in needed]
    symbols = list(byte_encoder.values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in kept]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]  # EOS last: the highest id, as the text config expects
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in kept) + "\n", encoding="utf-8")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(out), model_max_length=77)
    tok.save_pretrained(str(out))
    return out


def build_clip_tokenizer(out_dir: str | Path) -> Path:
    """Write OpenAI CLIP's full tokenizer (49408 entries: the vocabulary of SD 1.x/2.x and SDXL) from its merges.

    The vocabulary is CLIP's own construction: the 256 byte symbols, the same with the end-of-word mark, one
    entry per merge in rank order, then the two specials. Only vocab.json, merges.txt and the configs are written;
    `CLIPTokenizer.from_pretrained` builds its fast tokenizer from them.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(find_clip_bpe(), "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab_list)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    config = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
