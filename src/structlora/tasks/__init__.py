"""The tasks wing: the papers' data sets, prompts, metrics and decoding (GLUE, E2E / WebNLG / DART, SuperGLUE-style
LLM tasks), the one data-directory rule, bad-row handling and the prompt-learning decoding guards.

Tasks import the library (the package top) and each other's shared modules, never the command line
(``structlora.recipes``); see docs/ARCHITECTURE.md.
"""
