"""Human-readable listing of a config: every field, its value and its documentation."""

from __future__ import annotations

import dataclasses

from megatron_opd.config.loader import field_docs


def describe_config(config, prefix: str = "") -> str:
    """One line per field: ``section.field = value  # doc``."""
    lines = []
    docs = field_docs(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        name = prefix + f.name
        if dataclasses.is_dataclass(value):
            lines.append(f"[{name}]  # {docs.get(f.name, '')}")
            lines.append(describe_config(value, prefix=name + "."))
        else:
            lines.append(f"{name} = {value!r}  # {docs.get(f.name, '')}")
    return "\n".join(lines)
