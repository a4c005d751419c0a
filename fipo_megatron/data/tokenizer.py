"""Tokenizers: Hugging Face ``AutoTokenizer`` for real models, ``CharTokenizer`` for the synthetic task.

Both expose the small surface the data pipeline, trainer and tools use: ``encode``, ``decode``,
``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``, ``eos_token_id``,
``pad_token_id``, ``vocab_size``.
"""

from __future__ import annotations

import json
import os

CHAR_TOKENIZER_FILE = "char_tokenizer.json"


class CharTokenizer:
    """One token per character, after three special tokens: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2.

    The "chat template" is ``<bos>`` + the last user message: the synthetic task has no roles.
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    special_tokens = ("<pad>", "<bos>", "<eos>")

    def __init__(self, *, chars: list[str]):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError(f"chars must be distinct single characters, got {chars!r}")
        self.chars = list(chars)
        self._ids = {c: i + len(self.special_tokens) for i, c in enumerate(self.chars)}
        self.chat_template = "<bos>{content}"

    @property
    def vocab_size(self) -> int:
        """Special tokens plus characters: the model's vocabulary size."""
        return len(self.special_tokens) + len(self.chars)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (``<bos>`` first with ``add_special_tokens``); ValueError names unknown characters."""
        unknown = sorted({c for c in text if c not in self._ids})
        if unknown:
            raise ValueError(f"characters {unknown} are not in the synthetic vocabulary {self.chars}")
        return ([self.bos_token_id] if add_special_tokens else []) + [self._ids[c] for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The text of ``ids``; with ``skip_special_tokens`` it stops at ``<eos>`` and drops the others."""
        out = []
        for i in ids:
            i = int(i)
            if i < len(self.special_tokens):
                if i == self.eos_token_id and skip_special_tokens:
                    break  # nothing after EOS belongs to the response
                if not skip_special_tokens:
                    out.append(self.special_tokens[i])
            elif i < self.vocab_size:
                out.append(self.chars[i - len(self.special_tokens)])
            else:
                out.append("\ufffd")  # an id past the vocabulary (padded embedding rows)
        return "".join(out)

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = True, **_):
        """The HF tokenizer call the prompt encoder makes: ``<bos>`` + the last message's content."""
        content = messages[-1]["content"]
        return self.encode(content) if tokenize else "<bos>" + content

    def to_dict(self) -> dict:
        """The JSON form ``save_synthetic_tokenizer`` writes next to the tiny model."""
        return {"type": "CharTokenizer", "chars": self.chars}


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """Load the tokenizer at ``path``: a directory with ``char_tokenizer.json`` (synthetic task) or any
    Hugging Face tokenizer directory / hub name. Raises ValueError with the path when none loads."""
    if not path:
        raise ValueError("tokenizer path is empty: set model.tokenizer_path (or model.path)")
    char_file = os.path.join(path, CHAR_TOKENIZER_FILE)
    if os.path.isfile(char_file):
        with open(char_file) as f:
            spec = json.load(f)
        return CharTokenizer(chars=spec["chars"])
    if path.startswith(("/", ".", "~")) and not os.path.exists(os.path.expanduser(path)):
        raise ValueError(f"tokenizer path {path!r} does not exist")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError (missing files), ValueError (unknown class), hub errors offline
        raise ValueError(f"could not load a tokenizer from {path!r} ({type(exc).__name__}: {exc}); "
                         f"set model.tokenizer_path to an HF tokenizer directory") from exc


def encode_prompt(tokenizer, messages: list[dict], *, chat_template: bool, raw_template: str) -> list[int]:
    """Token ids of one prompt: the tokenizer's chat template with the generation prompt, or
    ``raw_template.format(content=<last message>)`` encoded with the tokenizer's own special tokens."""
    if isinstance(tokenizer, CharTokenizer):
        if chat_template:
            return tokenizer.apply_chat_template(messages, tokenize=True)
        return tokenizer.encode(raw_template.format(content=messages[-1]["content"]))
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; set data.chat_template=false and "
                             "data.raw_template (e.g. '{content}')")
        # Render to text and encode without extra specials: the template already holds BOS if any, and
        # apply_chat_template(tokenize=True) returns different types across transformers 4.x / 5.x.
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(raw_template.format(content=messages[-1]["content"])))
