"""What every section's schema shares: frozen models that refuse unknown keys, language codes, source names."""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from xlm_core.languages import ISO_639_1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_lang(code: str) -> str:
    if code not in ISO_639_1:
        raise ValueError(f"unknown language code {code!r}: use an ISO 639-1 code such as en, fr, ru, ar, zh")
    return code


def _check_langs(codes: list[str]) -> list[str]:
    for code in codes:
        _check_lang(code)
    if len(set(codes)) != len(codes):
        raise ValueError(f"languages {codes} repeat a code")
    return codes


LangCode = Annotated[str, Field(min_length=2, max_length=3)]
SourceName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]

