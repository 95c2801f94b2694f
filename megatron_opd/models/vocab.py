"""Student and teacher must index the same vocabulary: the distillation loss compares
their log-probabilities token id by token id.

Compared: ``vocab_size`` in config.json (the embedding rows), and the tokenizer files
present in either directory. For ``tokenizer.json`` only the parts that define ids are
hashed (the model's vocab/merges and the added tokens), so a different truncation or
padding setting does not count as a mismatch; other files are hashed byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megatron_opd.models.hf_config import find_hf_config_dir

TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")
"""Files whose content fixes the token ids."""


def _tokenizer_fingerprint(path: Path) -> str:
    if path.name == "tokenizer.json":
        data = json.loads(path.read_text())
        ids = {
            "model": data.get("model"),
            "added_tokens": [(t.get("id"), t.get("content")) for t in data.get("added_tokens", [])],
        }
        payload = json.dumps(ids, sort_keys=True).encode()
    else:
        payload = path.read_bytes()
    return hashlib.sha256(payload).hexdigest()


def check_vocab_compatible(student_dir: str | Path, teacher_dir: str | Path) -> None:
    """ValueError naming what differs when the two models do not share a vocabulary.

    Each directory may be an HF model directory or a converted Megatron checkpoint.
    """
    student = find_hf_config_dir(student_dir)
    teacher = find_hf_config_dir(teacher_dir)
    problems = []
    student_vocab = json.loads((student / "config.json").read_text()).get("vocab_size")
    teacher_vocab = json.loads((teacher / "config.json").read_text()).get("vocab_size")
    if student_vocab != teacher_vocab:
        problems.append(
            f"vocab_size in config.json differs: student {student_vocab}, teacher {teacher_vocab}"
        )
    for name in TOKENIZER_VOCAB_FILES:
        in_student, in_teacher = (student / name).is_file(), (teacher / name).is_file()
        if not in_student and not in_teacher:
            continue
        if in_student != in_teacher:
            where = "student" if in_student else "teacher"
            problems.append(f"{name} exists only in the {where} directory")
        elif _tokenizer_fingerprint(student / name) != _tokenizer_fingerprint(teacher / name):
            problems.append(f"{name} differs (token ids would not match)")
    if problems:
        raise ValueError(
            f"student ({student}) and teacher ({teacher}) do not share a vocabulary: "
            + "; ".join(problems)
            + ". Pick a teacher from the same tokenizer family as the student."
        )
