"""Integrations with other libraries (optional dependencies, imported lazily).

* :mod:`mtbkd.integrations.transformers`: ``MultiTeacherDistillationTrainer`` (extra ``llm``).
"""
