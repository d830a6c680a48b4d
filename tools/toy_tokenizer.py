"""A small real tokenizer for a random-weight checkpoint: ``python -m eep.tools.toy_tokenizer DIR``.

A byte-level BPE (the kind Qwen3 ships) trained with ``tokenizers`` on Python's own standard
library sources, so nothing is downloaded, then saved into ``DIR`` the way a Hugging Face
Qwen3 checkpoint keeps it: ``tokenizer.json``, ``tokenizer_config.json`` with a ChatML chat
template and ``<|im_end|>`` as its end of sequence, and ``generation_config.json`` naming the
end-of-sequence ids. With random weights from ``eep make-weights`` beside it, ``eep launch
--model DIR`` serves text and chat completions through it. Deterministic: the same vocabulary
size gives the same tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# ChatML, as Qwen's template writes it (without its tool calls)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TRAINING_FILES = 60  # of the standard library's modules, in name order


def training_files() -> list[str]:
    """Python sources that ship with the interpreter: the standard library's modules."""
    lib = Path(os.__file__).parent
    return [str(p) for p in sorted(lib.glob("*.py"))[:TRAINING_FILES]]


def train_byte_level(vocab_size: int):
    """A byte-level BPE of ``vocab_size`` tokens (its special tokens first, then the 256 byte
    symbols, then merges): a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(training_files(), trainer)
    return tok


def write_tokenizer(model_dir: str, vocab_size: int) -> dict[str, int]:
    """Train and save the tokenizer, its config and a generation config into ``model_dir``;
    returns the special tokens' ids."""
    tok = train_byte_level(vocab_size)
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t, i in ids.items()
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": [EOS_TOKEN, "<|im_start|>"],
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 131072,
        "split_special_tokens": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_generation_config(model_dir, [ids[EOS_TOKEN], ids[PAD_TOKEN]])
    return ids


def write_generation_config(model_dir: str, eos_token_ids: list[int]) -> None:
    gen = {"bos_token_id": None, "eos_token_id": eos_token_ids, "do_sample": False}
    (Path(model_dir) / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eep.tools.toy_tokenizer", description=__doc__)
    parser.add_argument("dir", help="the model directory (its config.json sets the vocabulary)")
    args = parser.parse_args(argv)
    try:
        with open(os.path.join(args.dir, "config.json")) as f:
            vocab_size = json.load(f)["vocab_size"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"toy_tokenizer: {args.dir} has no readable config.json with a vocab_size: {exc}")
        return 2
    ids = write_tokenizer(args.dir, vocab_size)
    print(f"wrote a {vocab_size}-token byte-level BPE with a chat template to {args.dir}: {ids}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
