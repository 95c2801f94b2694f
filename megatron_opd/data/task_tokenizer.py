"""SentencePiece tokenizers for the built-in tasks, trained on the task's own text.

The built-in tasks (chain sums, countdowns) are digit-by-digit reasoning in a tiny
alphabet, so their tokenizer is trained here rather than downloaded. The settings are the
ones those tasks need (probe ``reference/tiny_task``): ``split_digits`` (every digit its
own piece, so arithmetic runs digit by digit), a user symbol for newlines (else they
become ``<unk>``), no whitespace splitting and exact whitespace (so ``decode(encode(x))
== x``), and ``hard_vocab_limit=False`` because the corpus is so repetitive that BPE
cannot reach even a small vocabulary size.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from megatron_opd.data.tokenizer import NEWLINE_PIECE

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
"""Special ids of every task tokenizer."""


def train_sentencepiece(out_dir: str | Path, corpus: Iterable[str], *, vocab_size: int) -> Path:
    """Train a BPE SentencePiece model on ``corpus``; returns ``out_dir/tokenizer.model``.

    Ids: pad 0, bos 1, eos 2, unk 3; ``\\boxed{`` is one piece.
    """
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus_file = out_dir / "tokenizer_corpus.txt"
    corpus_file.write_text("\n".join(text.replace("\n", NEWLINE_PIECE) for text in corpus))
    spm.SentencePieceTrainer.train(
        input=str(corpus_file),
        model_prefix=str(out_dir / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        split_digits=True,
        split_by_whitespace=False,
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        character_coverage=1.0,
        user_defined_symbols=[NEWLINE_PIECE, "\\boxed{"],
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    corpus_file.unlink()
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    return out_dir / "tokenizer.model"
