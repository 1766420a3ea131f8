"""structlora's methods in PEFT's tables: importing this module registers them.

PEFT (0.21+) finds a method's config class, tuner and checkpoint-key prefix in module-level tables keyed by
`config.peft_type` (`peft.mapping.PEFT_TYPE_TO_*_MAPPING`). `peft.register_peft_method` accepts only the names
of PEFT's own enum, so structlora writes its `StructloraPeftType` entries into those tables directly: a pinned
plug-in, for the PEFT releases of `structlora.peft_support.SUPPORTED_PEFT` (importing `structlora.config` refuses
others). `import structlora` arranges for this module to be imported as soon as peft is (`structlora._plugin`).
"""

from __future__ import annotations

from peft import mapping

from .config import CONFIG_CLASSES_BY_PEFT_TYPE, PEFT_TYPE_MARKER
from .convert import LookAlikeFolder
from .peft_tuner import StructloraTuner


def register() -> None:
    """Write every structlora peft_type into PEFT's config, tuner and prefix tables (idempotent), and the marker of
    structlora's own folders into the config table (`structlora.convert.LookAlikeFolder`)."""
    for peft_type, config_class in CONFIG_CLASSES_BY_PEFT_TYPE.items():
        for table, value in ((mapping.PEFT_TYPE_TO_CONFIG_MAPPING, config_class),
                             (mapping.PEFT_TYPE_TO_TUNER_MAPPING, StructloraTuner),
                             (mapping.PEFT_TYPE_TO_PREFIX_MAPPING, StructloraTuner.prefix)):
            if table.get(peft_type, value) is not value:
                raise RuntimeError(f"PEFT's tables already hold another entry for {peft_type.name} "
                                   f"({table[peft_type]!r}); two copies of structlora imported?")
            table[peft_type] = value
    # structlora.PeftModel's own folders carry PEFT_TYPE_MARKER: PEFT's loaders then say to convert them.
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE_MARKER] = LookAlikeFolder


register()
