"""Character corpora: Tiny Shakespeare from the shared data directory, or any UTF-8 text file."""

from __future__ import annotations

from pathlib import Path

SHAKESPEARE = "tinyshakespeare.txt"


def read_text(path: Path, field: str) -> str:
    from ds_soo.config import ConfigError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{field}: cannot read {path} as UTF-8 text: {e}") from None
    if not text:
        raise ConfigError(f"{field}: {path} is empty; a character model needs text to train on")
    return text
