"""Versioned prompt templates (``configs/prompts/*.yaml``), rendered into OpenAI-style chat messages.

A template's ``id`` and ``version`` label every request built from it, so a changed prompt is
visible in the records and in the cache. A template file holds ``id`` (the file's stem),
``version`` (an integer from 1), ``stage``, ``description``, ``system`` (literal text), ``user`` (a
``str.format`` template using only its stage's fields, see :data:`STAGE_FIELDS`), ``few_shot``
(Q&A stages: a list of ``{<fields>..., reply}``) and ``sampling`` (``temperature``, ``top_p``,
``max_tokens``, ...).

>>> t = load_template("qa_freeform")
>>> msgs = t.render(caption="A red mug on a desk.")
>>> msgs[0]["role"], msgs[-1]["role"], "A red mug" in msgs[-1]["content"]
('system', 'user', True)
>>> t.key_fields()
{'id': 'qa_freeform', 'version': 1}
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from viscon_hub.errors import ConfigError
from viscon_hub.records import ImageContext

STAGE_FIELDS: dict[str, frozenset[str]] = {
    "caption_contextual": frozenset({"page_url", "alt_text", "context"}),
    "caption_non_contextual": frozenset(),
    "qa_freeform": frozenset({"caption"}),
    "qa_multiple_choice": frozenset({"caption"}),
}
IMAGE_STAGES = frozenset({"caption_contextual", "caption_non_contextual"})
SAMPLING_KEYS = frozenset(
    {"temperature", "top_p", "max_tokens", "seed", "stop", "presence_penalty", "frequency_penalty"}
)

_REQUIRED: dict[str, type] = {
    "id": str,
    "version": int,
    "stage": str,
    "description": str,
    "system": str,
    "user": str,
    "sampling": dict,
}
_OPTIONAL: dict[str, type] = {"few_shot": list}
_PACKAGE = Path(__file__).resolve().parents[1]


class FrozenMap(Mapping):
    """A read-only, hashable mapping, so that a :class:`PromptTemplate` stays hashable."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._data.items())))

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


@dataclass(frozen=True, slots=True)
class PromptTemplate:
    """One loaded, validated template; :func:`load_template` builds it."""

    id: str
    version: int
    stage: str
    description: str
    system: str
    user: str
    few_shot: tuple[FrozenMap, ...]
    sampling: FrozenMap
    path: str

    @property
    def fields(self) -> frozenset[str]:
        """The fields the ``user`` text uses (a subset of its stage's fields)."""
        return _used_fields(self.user)

    @property
    def label(self) -> str:
        return f"{self.id}@{self.version}"

    @property
    def takes_image(self) -> bool:
        return self.stage in IMAGE_STAGES

    def key_fields(self) -> dict[str, Any]:
        """What identifies the template in a request key."""
        return {"id": self.id, "version": self.version}

    def fill(self, **values: Any) -> str:
        """The ``user`` text with ``values`` filled in; a missing, ``None`` or foreign field is a ConfigError."""
        allowed = STAGE_FIELDS[self.stage]
        foreign = sorted(set(values) - allowed)
        if foreign:
            raise ConfigError(
                f"template {self.label} ({self.stage}) takes only {sorted(allowed)}; got unknown field(s) {foreign}"
            )
        missing = sorted(name for name in self.fields if values.get(name) is None)
        if missing:
            raise ConfigError(
                f"template {self.label} needs field(s) {missing}; got {sorted(k for k, v in values.items() if v is not None)}"
            )
        return self.user.format(**{name: values[name] for name in self.fields})

    def render(self, **values: Any) -> list[dict[str, Any]]:
        """Chat messages: system, few-shot user/assistant pairs, then the request.

        A caption stage's final user message is ``[{"type": "image"}, {"type": "text", ...}]``: the
        caller puts the image into the image part. A Q&A stage's final message is plain text.

        >>> msgs = load_template("contextual_caption").render(page_url="https://e.org", alt_text="none",
        ...                                                   context="A cat. <image>")
        >>> [p["type"] for p in msgs[-1]["content"]]
        ['image', 'text']
        """
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.system}]
        for example in self.few_shot:
            fields = {k: v for k, v in example.items() if k != "reply"}
            messages.append({"role": "user", "content": self.fill(**fields)})
            messages.append({"role": "assistant", "content": example["reply"]})
        text = self.fill(**values)
        if self.takes_image:
            messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]})
        else:
            messages.append({"role": "user", "content": text})
        return messages


def prompt_dirs() -> list[Path]:
    """Folders searched for a template by name, first match wins.

    ``$VISCON_PROMPTS``; ``$VISCON_CONFIGS/prompts``; the package's ``data/prompts`` and
    ``_configs/prompts`` (an installed wheel); the repository's ``configs/prompts``.
    """
    env = os.environ.get("VISCON_PROMPTS")
    if env:
        if not Path(env).is_dir():
            raise ConfigError(
                f"VISCON_PROMPTS={env!r} is not a folder; point it at a folder of prompt *.yaml files"
            )
        return [Path(env)]
    candidates = []
    configs = os.environ.get("VISCON_CONFIGS")
    if configs:
        candidates.append(Path(configs) / "prompts")
    candidates += [
        _PACKAGE / "data" / "prompts",
        _PACKAGE / "_configs" / "prompts",
        Path(__file__).resolve().parents[2] / "configs" / "prompts",
    ]
    return [c for c in candidates if c.is_dir()]


def _is_name(name_or_path: str | os.PathLike[str]) -> bool:
    if not isinstance(name_or_path, str):
        return False
    return not any(sep in name_or_path for sep in ("/", os.sep)) and not name_or_path.endswith(
        (".yaml", ".yml")
    )


def find_template(name: str) -> Path:
    """The path of the template called ``name`` in the first folder of :func:`prompt_dirs` holding it."""
    dirs = prompt_dirs()
    for folder in dirs:
        for suffix in (".yaml", ".yml"):
            path = folder / f"{name}{suffix}"
            if path.is_file():
                return path
    looked = ", ".join(str(d) for d in dirs) or "no prompt folder exists"
    raise ConfigError(
        f"prompt template {name!r} not found (looked in: {looked}); "
        "give a path to a .yaml file or set VISCON_PROMPTS to a folder holding it"
    )


def load_template(name_or_path: str | os.PathLike[str]) -> PromptTemplate:
    """Load and validate a template, by name (``"qa_freeform"``) or by path to a YAML file.

    >>> load_template("qa_multiple_choice").stage
    'qa_multiple_choice'
    """
    import yaml

    path = find_template(name_or_path) if _is_name(name_or_path) else Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"prompt template file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return _validate(data, path)


def _used_fields(text: str) -> frozenset[str]:
    return frozenset(name for _, name, _, _ in string.Formatter().parse(text) if name is not None)


def _validate(data: Any, path: Path) -> PromptTemplate:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping with keys {sorted(_REQUIRED)}; got {type(data).__name__}"
        )
    missing = sorted(set(_REQUIRED) - set(data))
    if missing:
        raise ConfigError(f"{path}: missing key(s) {missing}; a template needs {sorted(_REQUIRED)}")
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; allowed: {sorted({*_REQUIRED, *_OPTIONAL})}")
    for key, kind in {**_REQUIRED, **_OPTIONAL}.items():
        value = data.get(key)
        if key in data and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ConfigError(
                f"{path}: {key} must be {_kind(kind)}; got {type(value).__name__} {value!r:.60}"
            )
    if data["id"] != path.stem:
        raise ConfigError(f"{path}: id must equal the file's stem {path.stem!r}; got {data['id']!r}")
    if data["version"] < 1:
        raise ConfigError(f"{path}: version must be an integer >= 1; got {data['version']}")
    stage = data["stage"]
    if stage not in STAGE_FIELDS:
        raise ConfigError(f"{path}: stage must be one of {sorted(STAGE_FIELDS)}; got {stage!r}")
    for key in ("system", "user"):
        if not data[key].strip():
            raise ConfigError(f"{path}: {key} must be non-empty text; got {data[key]!r}")
    _check_user(data["user"], stage, path)
    sampling = _check_sampling(data["sampling"], path)
    few_shot = _check_few_shot(data.get("few_shot") or [], stage, path)
    template = PromptTemplate(
        id=data["id"],
        version=data["version"],
        stage=stage,
        description=data["description"],
        system=data["system"],
        user=data["user"],
        few_shot=few_shot,
        sampling=sampling,
        path=str(path),
    )
    for i, example in enumerate(template.few_shot):
        fields = {k: v for k, v in example.items() if k != "reply"}
        if template.fields - set(fields):
            raise ConfigError(
                f"{path}: few_shot[{i}] must give the field(s) {sorted(template.fields)}; got {sorted(fields)}"
            )
    return template


def _kind(kind: type) -> str:
    return {str: "text", int: "an integer", dict: "a mapping", list: "a list"}.get(kind, kind.__name__)


def _check_user(text: str, stage: str, path: Path) -> None:
    allowed = STAGE_FIELDS[stage]
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise ConfigError(
            f"{path}: user text has a malformed {{field}}: {e}; write literal braces as {{{{ }}}}"
        ) from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in allowed or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            expected = ", ".join("{" + f + "}" for f in sorted(allowed)) or "no fields"
            raise ConfigError(
                f"{path}: user text uses {shown}, but stage {stage} provides {expected} "
                "(plain fields only; write literal braces as {{ }})"
            )


def _check_sampling(sampling: dict, path: Path) -> FrozenMap:
    unknown = sorted(set(sampling) - SAMPLING_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown sampling key(s) {unknown}; allowed: {sorted(SAMPLING_KEYS)}")
    checks = {
        "temperature": (lambda v: _number(v) and 0 <= v <= 2, "a number in [0, 2]"),
        "top_p": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "max_tokens": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "an integer > 0"),
        "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
        "presence_penalty": (lambda v: _number(v) and -2 <= v <= 2, "a number in [-2, 2]"),
        "frequency_penalty": (lambda v: _number(v) and -2 <= v <= 2, "a number in [-2, 2]"),
        "stop": (
            lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
            "text or a list of texts",
        ),
    }
    for key, value in sampling.items():
        ok, expected = checks[key]
        if not ok(value):
            raise ConfigError(f"{path}: sampling.{key} must be {expected}; got {value!r}")
    if "max_tokens" not in sampling:
        raise ConfigError(f"{path}: sampling must set max_tokens (an integer > 0); got {sorted(sampling)}")
    return FrozenMap(sampling)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_few_shot(examples: list, stage: str, path: Path) -> tuple[FrozenMap, ...]:
    if examples and stage in IMAGE_STAGES:
        raise ConfigError(f"{path}: few_shot is for Q&A stages (text only); stage {stage} must have none")
    allowed = STAGE_FIELDS[stage] | {"reply"}
    out = []
    for i, example in enumerate(examples):
        if not isinstance(example, dict):
            raise ConfigError(
                f"{path}: few_shot[{i}] must be a mapping of fields and a reply; got {example!r:.60}"
            )
        keys = set(example)
        if "reply" not in keys or keys - allowed:
            raise ConfigError(
                f"{path}: few_shot[{i}] must have keys within {sorted(allowed)} including reply; got {sorted(keys)}"
            )
        bad = sorted(k for k, v in example.items() if not isinstance(v, str) or not v.strip())
        if bad:
            raise ConfigError(f"{path}: few_shot[{i}] values must be non-empty text; {bad} are not")
        out.append(FrozenMap(example))
    return tuple(out)


def context_fields(ctx: ImageContext) -> dict[str, str]:
    """The contextual caption template's fields for one image context.

    >>> ctx = ImageContext(id="d-0", document_id="d", image_index=0, page_url="https://e.org/p",
    ...                    image_url=None, image_path=None, image_bytes=None, alt_text=" ",
    ...                    context="Intro. <image>", context_tokens=4)
    >>> context_fields(ctx)
    {'page_url': 'https://e.org/p', 'alt_text': 'none', 'context': 'Intro. <image>'}
    """
    alt = " ".join((ctx.alt_text or "").split())
    return {
        "page_url": ctx.page_url or "unknown",
        "alt_text": alt or "none",
        "context": ctx.context,
    }
