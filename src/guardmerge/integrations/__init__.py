"""Adapters that put a merged guardmerge model behind other tools' interfaces.

- :mod:`guardmerge.integrations.llm_guard`: LLM Guard input scanners, one per head, sharing one
  forward pass per prompt (duck-typed: LLM Guard itself is not needed to import it).
"""
