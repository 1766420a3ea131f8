"""Data-to-text generation (E2E, WebNLG 2017, DART): data readers, prompt layout, beam-search decoding and
offline equivalents of the official metrics. The command-line entry points are ``structlora train nlg``,
``structlora generate`` and ``structlora score`` (see ``structlora.recipes``)."""
