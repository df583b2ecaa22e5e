"""Versioned prompt templates from ``configs/prompts/*.yaml``, rendered into chat messages.

A template's ``id`` and ``version`` enter every request key, so editing one template invalidates
only its own cached replies.

>>> t = load_template("qa_freeform")
>>> msgs = t.render(caption="A red mug on a desk.")
>>> msgs[0]["role"], msgs[-1]["role"], "A red mug" in msgs[-1]["content"]
('system', 'user', True)
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError
from ..records import ImageContext
from ..resources import configs_dir

STAGE_FIELDS: dict[str, frozenset[str]] = {
    "caption_contextual": frozenset({"page_url", "alt_text", "context"}),
    "caption_non_contextual": frozenset(),
    "qa_freeform": frozenset({"caption"}),
    "qa_multiple_choice": frozenset({"caption"}),
}
IMAGE_STAGES = frozenset({"caption_contextual", "caption_non_contextual"})
_REQUIRED = ("id", "version", "stage", "system", "user")


@dataclass(frozen=True, slots=True)
class PromptTemplate:
    id: str
    version: int
    stage: str
    description: str
    system: str
    user: str
    few_shot: tuple[MappingProxyType, ...]
    sampling: MappingProxyType
    path: str

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(name for _, name, _, _ in string.Formatter().parse(self.user) if name)

    def key_fields(self) -> dict[str, Any]:
        return {"id": self.id, "version": self.version}

    def _fill(self, values: dict[str, Any]) -> str:
        missing = sorted(self.fields - set(values))
        if missing:
            raise ConfigError(f"template {self.id}@{self.version} needs field(s) {missing}; got {sorted(values)}")
        return self.user.format(**{k: values[k] for k in self.fields})

    def render(self, **values: Any) -> list[dict[str, Any]]:
        """Chat messages: system, few-shot user/assistant pairs, then the request (with an image part
        first for caption stages; the engine's caller fills in the image's sha256)."""
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.system}]
        for example in self.few_shot:
            messages.append({"role": "user", "content": self._fill(dict(example))})
            messages.append({"role": "assistant", "content": example["reply"]})
        text = self._fill(values)
        if self.stage in IMAGE_STAGES:
            messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]})
        else:
            messages.append({"role": "user", "content": text})
        return messages


def prompts_dir() -> Path:
    env = os.environ.get("VISCON_PROMPTS")
    if env:
        return Path(env)
    root = configs_dir()
    if root is None or not (root / "prompts").is_dir():
        raise ConfigError("no prompt folder found: set VISCON_PROMPTS or reinstall viscon-hub")
    return root / "prompts"


def load_template(name_or_path: str | os.PathLike[str]) -> PromptTemplate:
    """Load and validate a template by name (``qa_freeform``) or by path to a YAML file."""
    import yaml

    path = Path(name_or_path)
    if not path.suffix:
        path = prompts_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"prompt template {str(name_or_path)!r} not found (looked for {path})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {list(_REQUIRED)}; got {type(data).__name__}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ConfigError(f"{path}: missing key(s) {missing}")
    stage = data["stage"]
    if stage not in STAGE_FIELDS:
        raise ConfigError(f"{path}: stage must be one of {sorted(STAGE_FIELDS)}; got {stage!r}")
    if not isinstance(data["version"], int) or data["version"] < 1:
        raise ConfigError(f"{path}: version must be a whole number >= 1; got {data['version']!r}")
    for key in ("system", "user"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise ConfigError(f"{path}: {key} must be non-empty text")
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(data["user"]) if name}
    except ValueError as e:
        raise ConfigError(f"{path}: bad placeholder in user text: {e}") from None
    unknown = sorted(used - STAGE_FIELDS[stage])
    if unknown:
        raise ConfigError(
            f"{path}: user text uses field(s) {unknown} that stage {stage} does not provide; "
            f"allowed: {sorted(STAGE_FIELDS[stage])}"
        )
    few_shot = data.get("few_shot") or []
    if not isinstance(few_shot, list) or not all(isinstance(x, dict) and "reply" in x for x in few_shot):
        raise ConfigError(f"{path}: few_shot must be a list of mappings, each with a reply")
    sampling = data.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise ConfigError(f"{path}: sampling must be a mapping")
    template = PromptTemplate(
        id=str(data["id"]),
        version=data["version"],
        stage=stage,
        description=str(data.get("description", "")),
        system=data["system"],
        user=data["user"],
        few_shot=tuple(MappingProxyType(dict(x)) for x in few_shot),
        sampling=MappingProxyType(dict(sampling)),
        path=str(path),
    )
    for example in template.few_shot:
        template._fill(dict(example))  # every example must fill the template
    return template


def context_fields(ctx: ImageContext) -> dict[str, str]:
    """The contextual caption template's fields for one image context."""
    return {
        "page_url": ctx.page_url or "unknown",
        "alt_text": ctx.alt_text or "none",
        "context": ctx.context,
    }
