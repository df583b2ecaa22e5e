"""The record types that flow between stages, and their Arrow schemas.

A :class:`Document` is one validated OBELICS-shaped web document. An :class:`ImageContext` is one
image of a kept document with its web context; later stages add fields to it, they do not invent a
parallel shape: a :class:`Generation` is an ``ImageContext`` plus what ``viscon generate`` made of it,
and every column list of the build, merge, statistics and card derives from its schema.

>>> src = ImageSource(url="https://example.org/a.jpg")
>>> src.kind
'url'
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

IMAGE_PLACEHOLDER = "<image>"
OTHER_IMAGE_PLACEHOLDER = "<another-image>"


@dataclass(frozen=True, slots=True)
class ImageSource:
    """Where an image comes from: exactly one of an HTTP(S) URL, a local path or embedded bytes."""

    url: str | None = None
    path: str | None = None
    data: bytes | None = None

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.url, self.path, self.data))
        if given != 1:
            raise ValueError(f"ImageSource needs exactly one of url, path, data; got {given}")

    @property
    def kind(self) -> Literal["url", "path", "bytes"]:
        if self.url is not None:
            return "url"
        if self.path is not None:
            return "path"
        return "bytes"

    @property
    def key(self) -> str:
        """A stable text key for the source (bytes are keyed by their hash by the image store)."""
        if self.url is not None:
            return self.url
        if self.path is not None:
            return "file://" + self.path
        return "sha256:" + hashlib.sha256(self.data or b"").hexdigest()


@dataclass(slots=True)
class Document:
    """One validated web document: parallel ``texts`` / ``images`` lists, one item set per position."""

    id: str
    url: str | None
    texts: list[str | None]
    images: list[ImageSource | None]
    image_metadata: list[dict[str, Any] | None]
    general_metadata: dict[str, Any]
    source: str
    row: int
    text_tokens: int | None = None

    @property
    def image_positions(self) -> list[int]:
        return [i for i, img in enumerate(self.images) if img is not None]

    @property
    def text(self) -> str:
        """The document's text alone, paragraphs joined as OBELICS merged them."""
        return "\n\n".join(t for t in self.texts if t is not None)


@dataclass(slots=True)
class ImageContext:
    """One image of a kept document with its web context; the unit every later stage consumes."""

    id: str
    document_id: str
    image_index: int
    page_url: str | None
    image_url: str | None
    image_path: str | None
    image_bytes: bytes | None
    alt_text: str | None
    context: str
    context_tokens: int
    image_sha256: str | None = None
    width: int | None = None
    height: int | None = None
    image_format: str | None = None
    source: str = ""
    row: int = 0
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        row = {name: getattr(self, name) for name in IMAGE_CONTEXT_SCHEMA.names if name != "provenance"}
        row["provenance"] = json.dumps(self.provenance, sort_keys=True, ensure_ascii=False)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ImageContext:
        values = dict(row)
        values["provenance"] = json.loads(values.get("provenance") or "{}")
        return cls(**values)


DOCUMENT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("texts", pa.list_(pa.string())),
        pa.field("images", pa.list_(pa.string())),
        pa.field("metadata", pa.string()),
        pa.field("general_metadata", pa.string()),
        pa.field("source", pa.string()),
        pa.field("row", pa.int64()),
        pa.field("text_tokens", pa.int64()),
    ]
)

IMAGE_CONTEXT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("document_id", pa.string(), nullable=False),
        pa.field("image_index", pa.int32(), nullable=False),
        pa.field("page_url", pa.string()),
        pa.field("image_url", pa.string()),
        pa.field("image_path", pa.string()),
        pa.field("image_bytes", pa.binary()),
        pa.field("alt_text", pa.string()),
        pa.field("context", pa.string(), nullable=False),
        pa.field("context_tokens", pa.int32(), nullable=False),
        pa.field("image_sha256", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("image_format", pa.string()),
        pa.field("source", pa.string()),
        pa.field("row", pa.int64()),
        pa.field("provenance", pa.string()),
    ]
)


def document_to_row(doc: Document) -> dict[str, Any]:
    """The OBELICS-shaped row of a document (image sources written back as URL or path)."""
    images = [None if s is None else (s.url or s.path) for s in doc.images]
    return {
        "id": doc.id,
        "url": doc.url,
        "texts": doc.texts,
        "images": images,
        "metadata": json.dumps(doc.image_metadata, ensure_ascii=False),
        "general_metadata": json.dumps(doc.general_metadata, ensure_ascii=False),
        "source": doc.source,
        "row": doc.row,
        "text_tokens": doc.text_tokens,
    }


QA_FREEFORM_TYPE = pa.list_(pa.struct([("question", pa.string()), ("answer", pa.string())]))
QA_MULTIPLE_CHOICE_TYPE = pa.list_(
    pa.struct([("question", pa.string()), ("options", pa.list_(pa.string())), ("answer", pa.string())])
)


@dataclass(slots=True, kw_only=True)
class Generation(ImageContext):
    """What ``viscon generate`` made of one :class:`ImageContext` in one context mode.

    The image's bytes stay in the image store (``image_sha256`` names them), so a record is its
    context plus: the mode, whether it survived (``status`` ``ok`` or ``dropped`` with a
    ``drop_reason``), the caption, the Q&A, the prompt templates and the cache keys of the replies.
    One row of ``generations/records.parquet``; :data:`GENERATION_SCHEMA` is its Arrow schema.

    >>> g = Generation(id="d-0", document_id="d", image_index=0, page_url=None, image_url=None,
    ...                image_path=None, image_bytes=None, alt_text=None, context="", context_tokens=0,
    ...                context_mode="contextual", status="ok", caption="A mug.")
    >>> row = g.to_row(); "image_bytes" in row, row["caption"], Generation.from_row(row) == g
    (False, 'A mug.', True)
    """

    context_mode: str
    status: str
    drop_reason: str | None = None
    caption: str | None = None
    caption_model: str | None = None
    caption_template: str | None = None
    caption_key: str | None = None
    qa_model: str | None = None
    qa_freeform: list[dict[str, Any]] | None = None
    qa_freeform_template: str | None = None
    qa_freeform_key: str | None = None
    qa_multiple_choice: list[dict[str, Any]] | None = None
    qa_multiple_choice_template: str | None = None
    qa_multiple_choice_key: str | None = None

    def to_row(self) -> dict[str, Any]:
        row = {name: getattr(self, name) for name in GENERATION_SCHEMA.names if name != "provenance"}
        row["provenance"] = json.dumps(self.provenance, sort_keys=True, ensure_ascii=False)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Generation:
        values = {k: v for k, v in row.items() if k in GENERATION_SCHEMA.names}
        values["provenance"] = json.loads(values.get("provenance") or "{}")
        return cls(image_bytes=None, **values)


GENERATION_SCHEMA = pa.schema(
    [f for f in IMAGE_CONTEXT_SCHEMA if f.name != "image_bytes"]
    + [
        pa.field("context_mode", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("drop_reason", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("caption_model", pa.string()),
        pa.field("caption_template", pa.string()),
        pa.field("caption_key", pa.string()),
        pa.field("qa_model", pa.string()),
        pa.field("qa_freeform", QA_FREEFORM_TYPE),
        pa.field("qa_freeform_template", pa.string()),
        pa.field("qa_freeform_key", pa.string()),
        pa.field("qa_multiple_choice", QA_MULTIPLE_CHOICE_TYPE),
        pa.field("qa_multiple_choice_template", pa.string()),
        pa.field("qa_multiple_choice_key", pa.string()),
    ]
)

# Column groups of a generation record, named once for every reader of records.parquet.
GENERATION_TEMPLATE_COLUMNS = ("caption_template", "qa_freeform_template", "qa_multiple_choice_template")
GENERATION_KEY_COLUMNS = ("caption_key", "qa_freeform_key", "qa_multiple_choice_key")
# The page text and its provenance: only the per-image configs show them.
GENERATION_PAGE_COLUMNS = (
    "context",
    "context_tokens",
    "alt_text",
    "image_url",
    "image_path",
    "source",
    "row",
)
GENERATION_COLUMNS = tuple(GENERATION_SCHEMA.names)
