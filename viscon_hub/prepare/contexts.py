"""Context extraction: one :class:`ImageContext` per image of a kept document.

The context is the document with ``<image>`` where this image stands and ``<another-image>`` where
every other image stands, positions joined as OBELICS joined paragraphs.

>>> from viscon_hub.records import Document, ImageSource
>>> doc = Document(id="d", url="https://example.org", texts=["A", None, None],
...                images=[None, ImageSource(url="https://example.org/1.jpg"),
...                        ImageSource(url="https://example.org/2.jpg")],
...                image_metadata=[None, {"alt_text": "one"}, {}], general_metadata={}, source="s", row=0,
...                text_tokens=1)
>>> [c.context for c in extract_contexts(doc)]
['A\\n\\n<image>\\n\\n<another-image>', 'A\\n\\n<another-image>\\n\\n<image>']
"""

from __future__ import annotations

from typing import Any

from viscon_hub.records import IMAGE_PLACEHOLDER, OTHER_IMAGE_PLACEHOLDER, Document, ImageContext

_PROVENANCE_KEYS = ("warc_filename", "warc_record_offset", "warc_record_length", "constructed_example")


def extract_contexts(doc: Document, *, max_images: int | None = None) -> list[ImageContext]:
    """The image contexts of ``doc``; with ``max_images``, only its first that many images."""
    positions = doc.image_positions
    if max_images is not None:
        positions = positions[:max_images]
    general = {k: doc.general_metadata[k] for k in _PROVENANCE_KEYS if k in doc.general_metadata}
    contexts = []
    for image_index, position in enumerate(positions):
        parts = []
        for i, text in enumerate(doc.texts):
            if text is not None:
                parts.append(text)
            else:
                parts.append(IMAGE_PLACEHOLDER if i == position else OTHER_IMAGE_PLACEHOLDER)
        source = doc.images[position]
        meta: dict[str, Any] = doc.image_metadata[position] or {}
        provenance = {"source": doc.source, "row": doc.row, "position": position, **general}
        if meta:
            provenance["image_metadata"] = meta
        contexts.append(
            ImageContext(
                id=f"{doc.id}-{image_index}",
                document_id=doc.id,
                image_index=image_index,
                page_url=doc.url,
                image_url=source.url,
                image_path=source.path,
                image_bytes=source.data,
                alt_text=_alt_text(meta),
                context="\n\n".join(parts),
                context_tokens=doc.text_tokens if doc.text_tokens is not None else -1,
                source=doc.source,
                row=doc.row,
                provenance=provenance,
            )
        )
    return contexts


def _alt_text(meta: dict[str, Any]) -> str | None:
    alt = meta.get("alt_text")
    if isinstance(alt, str) and alt.strip():
        return alt.strip()
    return None
