"""The CPU demo: assets (task, tokenizer, tiny teacher and student) and the distillation run."""
