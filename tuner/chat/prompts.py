"""The chat's system prompt: --system, or --system-template NAME (XTuner's SYSTEM_TEMPLATE, in tuner.data)."""

from __future__ import annotations

from tuner.data.system_templates import SYSTEM_TEMPLATES
from tuner.errors import TunerError


def system_prompt(system: str | None, system_template: str | None, bot_name: str) -> str | None:
    if system and system_template:
        raise TunerError("give --system or --system-template, not both")
    if system_template:
        if system_template not in SYSTEM_TEMPLATES:
            raise TunerError(f"unknown system template {system_template!r}; known: {', '.join(SYSTEM_TEMPLATES)}")
        return SYSTEM_TEMPLATES[system_template].format(bot_name=bot_name)
    return system
