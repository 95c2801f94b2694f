"""Tokenizers behind one small protocol: Hugging Face directories and SentencePiece models.

The trainer needs little from a tokenizer: turn a problem into prompt token ids (applying
the chat template the model was trained with), decode responses, and know the EOS, PAD
and BOS ids and the vocabulary size. :class:`Tokenizer` is that protocol; two
implementations fill it:

- :class:`HFTokenizer`: ``AutoTokenizer`` from a local directory (``local_files_only``:
  never the hub). Uses the tokenizer's chat template when it has one.
- :class:`SentencePieceTokenizer`: a bare ``tokenizer.model``. A model that defines the
  user symbol ``<nl>`` (the built-in task tokenizer does, because SentencePiece otherwise
  maps ``\\n`` to ``<unk>``) gets newlines translated to and from that piece.

:func:`load_tokenizer` picks the implementation from the files present. Student and
teacher must share one vocabulary for token-level distillation;
:func:`check_same_vocabulary` says which file or field differs when they do not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

NEWLINE_PIECE = "<nl>"
"""SentencePiece user symbol that stands for a newline in task tokenizers."""

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SENTENCEPIECE_FILE = "tokenizer.model"


@runtime_checkable
class Tokenizer(Protocol):
    """What the trainer, rollout and evaluation need from a tokenizer."""

    name: str
    """Where it came from (a directory or file), for error messages."""

    kind: str
    """``"hf"`` or ``"sentencepiece"``."""

    eos_id: int
    """Id that ends a response."""

    pad_id: int
    """Id used for padding (the EOS id when the tokenizer defines no pad token)."""

    bos_id: int | None
    """Id put before every prompt, or None when the tokenizer (or its template) adds none."""

    vocab_size: int
    """Number of token ids the tokenizer can produce (before any model-side padding)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special tokens (pad, bos, eos) are dropped."""
        ...

    def format_prompt(self, problem: str) -> str:
        """The prompt text the model sees for a user ``problem`` (chat template applied)."""
        ...

    def encode_prompt(self, problem: str) -> list[int]:
        """Prompt token ids for ``problem``: BOS (if any) + ``encode(format_prompt(problem))``."""
        ...

    def token_strings(self) -> list[str]:
        """The string of every id ``0 .. vocab_size - 1`` (for vocabulary comparison)."""
        ...


def plain_prompt_template(problem: str) -> str:
    """Prompt for tokenizers without a chat template: the problem, then one newline."""
    return problem if problem.endswith("\n") else problem + "\n"


class SentencePieceTokenizer:
    """A SentencePiece ``tokenizer.model`` with the plain prompt template."""

    kind = "sentencepiece"

    def __init__(self, model_file: str | Path) -> None:
        import sentencepiece as spm

        model_file = Path(model_file)
        if not model_file.is_file():
            raise ValueError(f"SentencePiece model {model_file} does not exist")
        self.name = str(model_file)
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(
                f"SentencePiece model {model_file} defines no eos id; train it with eos_id set"
            )
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else self.eos_id
        bos = self._sp.bos_id()
        self.bos_id = bos if bos >= 0 else None
        newline = self._sp.piece_to_id(NEWLINE_PIECE)
        self._newline_piece = newline != self._sp.unk_id() and newline >= 0

    def encode(self, text: str) -> list[int]:
        if self._newline_piece:
            text = text.replace("\n", NEWLINE_PIECE)
        return list(self._sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        text = self._sp.decode([int(i) for i in ids])
        return text.replace(NEWLINE_PIECE, "\n") if self._newline_piece else text

    def format_prompt(self, problem: str) -> str:
        return plain_prompt_template(problem)

    def encode_prompt(self, problem: str) -> list[int]:
        ids = self.encode(self.format_prompt(problem))
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def token_strings(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]


class HFTokenizer:
    """A Hugging Face tokenizer from a local directory; chat template when it has one."""

    kind = "hf"

    def __init__(self, directory: str | Path, *, chat_template_kwargs: dict | None = None) -> None:
        from transformers import AutoTokenizer

        directory = Path(directory)
        try:
            self._tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"cannot load a Hugging Face tokenizer from {directory}: {err}"
            ) from None
        self.name = str(directory)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        """Extra variables for the chat template (e.g. Qwen3's ``enable_thinking``)."""
        self.vocab_size = len(self._tok)
        if self._tok.eos_token_id is None:
            raise ValueError(f"tokenizer in {directory} defines no eos_token; set it in its config")
        self.eos_id = int(self._tok.eos_token_id)
        pad = self._tok.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self.has_chat_template = bool(getattr(self._tok, "chat_template", None))
        # A chat template writes its own leading special tokens; only plain prompts get BOS.
        bos = self._tok.bos_token_id
        self.bos_id = int(bos) if bos is not None and not self.has_chat_template else None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def format_prompt(self, problem: str) -> str:
        if not self.has_chat_template:
            return plain_prompt_template(problem)
        messages = [{"role": "user", "content": problem}]
        return self._tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **self.chat_template_kwargs
        )

    def encode_prompt(self, problem: str) -> list[int]:
        ids = self.encode(self.format_prompt(problem))
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def token_strings(self) -> list[str]:
        return self._tok.convert_ids_to_tokens(list(range(self.vocab_size)))


def load_tokenizer(path: str | Path, *, chat_template_kwargs: dict | None = None) -> Tokenizer:
    """Tokenizer of a model directory (or a ``tokenizer.model`` file).

    A directory with ``tokenizer.json`` or ``tokenizer_config.json`` loads with Hugging
    Face; otherwise one with ``tokenizer.model`` loads with SentencePiece (no chat
    template: ``chat_template_kwargs`` only reach Hugging Face chat templates).
    """
    path = Path(path)
    if path.is_file() and path.name.endswith(".model"):
        return SentencePieceTokenizer(path)
    if not path.is_dir():
        raise ValueError(f"tokenizer path {path} is neither a directory nor a .model file")
    if any((path / name).is_file() for name in HF_TOKENIZER_FILES):
        return HFTokenizer(path, chat_template_kwargs=chat_template_kwargs)
    if (path / SENTENCEPIECE_FILE).is_file():
        return SentencePieceTokenizer(path / SENTENCEPIECE_FILE)
    raise ValueError(
        f"no tokenizer in {path}: expected one of {', '.join(HF_TOKENIZER_FILES)} "
        f"or {SENTENCEPIECE_FILE}"
    )


def check_same_vocabulary(student_tokenizer_dir: str | Path, teacher_tokenizer_dir: str | Path):
    """Raise ValueError naming the first difference between two tokenizers' vocabularies.

    Compared: the tokenizer kind (which file defines it), vocabulary size, EOS/PAD/BOS
    ids, and the string of every id. Returns the student tokenizer when they match.
    """
    student = load_tokenizer(student_tokenizer_dir)
    teacher = load_tokenizer(teacher_tokenizer_dir)
    where = f"student tokenizer {student.name} vs teacher tokenizer {teacher.name}"
    if student.kind != teacher.kind:
        raise ValueError(
            f"{where}: different tokenizer files ({student.kind} vs {teacher.kind}); "
            "distillation needs the teacher's tokenizer files in both directories"
        )
    for field in ("vocab_size", "eos_id", "pad_id", "bos_id"):
        a, b = getattr(student, field), getattr(teacher, field)
        if a != b:
            raise ValueError(f"{where}: {field} differs ({a} vs {b}); use one shared tokenizer")
    for index, (a, b) in enumerate(zip(student.token_strings(), teacher.token_strings())):
        if a != b:
            raise ValueError(
                f"{where}: token id {index} differs ({a!r} vs {b!r}); use one shared tokenizer"
            )
    return student
