"""Validation: a raw OBELICS-shaped row becomes a :class:`Document` or a drop with a named reason.

Nothing here raises on bad data: every malformed row maps to one of :data:`DROP_REASONS`.

>>> from viscon_hub.prepare.readers import RawRow
>>> row = {"texts": ["Hi", None], "images": [None, "https://example.org/a.jpg"],
...        "metadata": '[null, {"alt_text": "a"}]', "general_metadata": '{"url": "https://example.org"}'}
>>> doc, reason = parse_row(RawRow(data=row, source="x", row=0))
>>> (doc.url, reason)
('https://example.org', None)
>>> parse_row(RawRow(data={**row, "texts": ["Hi"]}, source="x", row=1))[1]
'length_mismatch'
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import posixpath
import re
from typing import Any

from viscon_hub.errors import redact
from viscon_hub.prepare.readers import RawRow
from viscon_hub.records import Document, ImageSource

END_OF_DOCUMENT = "END_OF_DOCUMENT_TOKEN_TO_BE_REPLACED"

DROP_REASONS = (
    "unreadable_file",
    "invalid_utf8",
    "invalid_json",
    "invalid_unicode",
    "too_deep",
    "too_large",
    "not_a_mapping",
    "missing_column",
    "wrong_type",
    "metadata_not_json",
    "metadata_not_list",
    "general_metadata_not_json",
    "length_mismatch",
    "text_and_image_at_one_position",
    "null_text",
    "image_without_url",
    "bad_image_reference",
    "unsupported_scheme",
    "image_outside_root",
    "no_image",
    "no_text",
    "empty_document",
    "duplicate_document",
)

# Deeper than any real OBELICS row (metadata is three levels); bounds every walk over a row.
MAX_DEPTH = 32
# One paragraph or one URL longer than this is not web text but an attack or a broken export.
MAX_STRING_CHARS = 4_000_000
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_row(raw: RawRow, *, image_roots: tuple[str, ...] = ()) -> tuple[Document | None, str | None]:
    """Validate one row; return ``(document, None)`` or ``(None, reason)``.

    A local image path must lie under the folder of the row's own file or under one of
    ``image_roots`` (after symlinks are resolved); anything else is ``image_outside_root``.
    """
    if raw.error is not None or raw.data is None:
        reason = (raw.error or "not_a_mapping").split(":", 1)[0]
        return None, reason if reason in DROP_REASONS else "invalid_json"
    data = raw.data
    if not isinstance(data, dict):
        return None, "not_a_mapping"
    reason = _check_content({k: data.get(k) for k in ("images", "texts", "metadata", "general_metadata")})
    if reason:
        return None, reason
    for column in ("images", "texts", "metadata"):
        if column not in data:
            return None, "missing_column"
    images, texts = data["images"], data["texts"]
    if not isinstance(images, list) or not isinstance(texts, list):
        return None, "wrong_type"
    metadata, reason = _decode_json(
        data["metadata"], expect=list, not_json="metadata_not_json", wrong="metadata_not_list"
    )
    if reason:
        return None, reason
    general, reason = _decode_json(
        data.get("general_metadata"),
        expect=dict,
        not_json="general_metadata_not_json",
        wrong="general_metadata_not_json",
        default={},
    )
    if reason:
        return None, reason
    reason = _check_content([metadata, general])
    if reason:
        return None, reason
    if not (len(images) == len(texts) == len(metadata)):
        return None, "length_mismatch"

    out_texts: list[str | None] = []
    out_images: list[ImageSource | None] = []
    out_meta: list[dict[str, Any] | None] = []
    for text, image, meta in zip(texts, images, metadata):
        if text is not None and not isinstance(text, str):
            return None, "wrong_type"
        if meta is not None and not isinstance(meta, dict):
            return None, "wrong_type"
        if text is not None and image is not None:
            return None, "text_and_image_at_one_position"
        if text is not None:
            text = _clean_text(text)
            if not text:
                continue  # an empty paragraph (e.g. only the end-of-document marker) is no position
            if out_texts and out_texts[-1] is not None:
                out_texts[-1] = out_texts[-1] + "\n\n" + text  # OBELICS merges consecutive texts so
            else:
                out_texts.append(text)
                out_images.append(None)
                out_meta.append(None)
            continue
        if image is None:
            # An image entry in the metadata but no URL, or neither text nor image at all.
            return None, "image_without_url" if meta is not None else "null_text"
        source, reason = _image_source(image, raw.base, image_roots)
        if reason:
            return None, reason
        out_texts.append(None)
        out_images.append(source)
        out_meta.append(meta or {})

    if not out_texts:
        return None, "empty_document"
    if all(img is None for img in out_images):
        return None, "no_image"
    if all(t is None for t in out_texts):
        return None, "no_text"

    url = general.get("url") if isinstance(general.get("url"), str) else None
    if url is None:
        url = next(
            (m.get("document_url") for m in out_meta if m and isinstance(m.get("document_url"), str)), None
        )
    if url is not None:
        url = redact(url, limit=None)  # a page URL with user:password@ is stored without them
    doc_id = _document_id(url, out_texts, out_images)
    return (
        Document(
            id=doc_id,
            url=url,
            texts=out_texts,
            images=out_images,
            image_metadata=out_meta,
            general_metadata=general,
            source=_SURROGATE.sub("\ufffd", raw.source),  # a file name that is not UTF-8 still writes
            row=raw.row,
        ),
        None,
    )


def _decode_json(value: Any, *, expect: type, not_json: str, wrong: str, default: Any = None):
    if value is None and default is not None:
        return default, None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, not_json
        except RecursionError:
            return None, "too_deep"
    # Some exports store the metadata already decoded; accept that as long as the type is right.
    if not isinstance(value, expect):
        return None, wrong
    return value, None


def _check_content(value: Any) -> str | None:
    """``too_deep``, ``too_large`` or ``invalid_unicode`` (a lone surrogate, unwritable as UTF-8), else None.

    An explicit stack rather than recursion, so that a hostile nesting cannot exhaust Python's.
    """
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if len(item) > MAX_STRING_CHARS:
                return "too_large"
            if _SURROGATE.search(item):
                return "invalid_unicode"
        elif isinstance(item, (list, tuple, dict)):
            if depth >= MAX_DEPTH:
                return "too_deep"
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None


def _clean_text(text: str) -> str:
    if END_OF_DOCUMENT in text:
        parts = [p.strip() for p in text.replace(END_OF_DOCUMENT, "\n\n").split("\n\n")]
        text = "\n\n".join(p for p in parts if p)
    return text.strip()


def _image_source(
    image: Any, base: str | None, roots: tuple[str, ...] = ()
) -> tuple[ImageSource | None, str | None]:
    if isinstance(image, dict):
        # The datasets Image feature's storage: {"bytes": ..., "path": ...}.
        data = image.get("bytes")
        if data is not None and not isinstance(data, (bytes, bytearray, memoryview)):
            return None, "wrong_type"
        if data:
            return ImageSource(data=bytes(data)), None
        image = image.get("path")
        if image is None:
            return None, "image_without_url"
    if isinstance(image, (bytes, bytearray)):
        return (ImageSource(data=bytes(image)), None) if image else (None, "image_without_url")
    if not isinstance(image, str):
        return None, "wrong_type"
    image = image.strip()
    if not image:
        return None, "image_without_url"
    scheme = _SCHEME.match(image)
    scheme = scheme.group(1).lower() if scheme else None
    if scheme in ("http", "https"):
        # Credentials in a crawled URL are someone's secret: never sent, never stored.
        return ImageSource(url=redact(image, limit=None)), None
    if scheme == "data":
        head, _, payload = image.partition(",")
        if ";base64" not in head:
            return None, "bad_image_reference"
        try:
            return ImageSource(data=base64.b64decode(payload, validate=True)), None
        except (binascii.Error, ValueError):
            return None, "bad_image_reference"
    if scheme == "file":
        image = image[len("file://") :] if image[:7].lower() == "file://" else image[len("file:") :]
        if not image.startswith("/"):
            return None, "bad_image_reference"
    elif scheme is not None:
        # javascript:, gopher:, s3://... : nothing the image stage may open on a document's say-so.
        return None, "unsupported_scheme"
    if base is not None and "://" in base:
        return None, "image_outside_root"  # relative paths inside a remote source are not fetched
    path = image if image.startswith("/") or base is None else posixpath.join(base, image)
    allowed = tuple(r for r in (base, *roots) if r)
    if not _under_any(path, allowed):
        return None, "image_outside_root"
    return ImageSource(path=os.path.realpath(path)), None


def _under_any(path: str, roots: tuple[str, ...]) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside one of ``roots`` (symlinks resolved)."""
    real = os.path.realpath(path)
    for root in roots:
        top = os.path.realpath(root)
        if real == top or real.startswith(top.rstrip(os.sep) + os.sep):
            return True
    return False


def _document_id(url: str | None, texts: list[str | None], images: list[ImageSource | None]) -> str:
    h = hashlib.sha256()
    h.update((url or "").encode())
    for text, image in zip(texts, images):
        h.update(b"\x00T" + text.encode() if text is not None else b"\x00I" + image.key.encode())
    return h.hexdigest()[:20]
