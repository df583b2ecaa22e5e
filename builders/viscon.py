"""The ``datasets`` builder of the VisCon configs.

It describes the data and reads it from cached generations; it never calls a model. Question
embeddings for the dedup are read from the engine cache too, so run ``viscon build`` (or any build
with the same records and cache) once before using the builder; a cache miss is an error that says so.

Dataset scripts are gone from ``datasets`` (4.0 removed them), so this is used from Python::

    from builders.viscon import VisconBuilder
    b = VisconBuilder(config_name="leaky", generations="viscon-work/generations",
                      cache="viscon-cache", extra_caches=[...])
    b.download_and_prepare()
    ds = b.as_dataset(split="train")

What is published is plain Parquet (``viscon build`` / ``viscon push``), which ``load_dataset`` reads
without this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import datasets

from viscon_hub import __version__
from viscon_hub.build.dedup import DedupConfig
from viscon_hub.build.layout import (
    ALL_CONFIGS,
    DEFAULT_CONFIG,
    DEFAULT_TEST_FRACTION,
    config_mix,
    config_mode,
    features_for,
)
from viscon_hub.build.merge import MergeConfig, Merger

_DESCRIPTIONS = {
    "contextual": "one row per image with its web context and everything generated for it with that context",
    "non_contextual": "one row per image with everything generated for it from the image alone",
    "captions_only": "one conversation per image: a caption request and the contextual caption",
    "qa_only": "one conversation per image: its deduplicated, shuffled Q&A rounds",
    "leaky": "one conversation per image: the caption round and its Q&A rounds together (VisCon-100K)",
    "split": "two samples per image: the caption round alone and the Q&A rounds alone",
}


def _description(name: str) -> str:
    mix = config_mix(name)
    if mix is None:
        return _DESCRIPTIONS[name]
    text = _DESCRIPTIONS[mix]
    return (
        text
        if config_mode(name) == "contextual"
        else text.replace("contextual caption", "caption") + (", from the non-contextual generations")
    )


@dataclass
class VisconConfig(datasets.BuilderConfig):
    """A VisCon config plus where its generations live."""

    generations: str | None = None
    cache: str = "viscon-cache"
    extra_caches: list[str] = field(default_factory=list)
    image_store: str | None = None
    test_fraction: float = DEFAULT_TEST_FRACTION
    dedup_model: str | None = None
    dedup_threshold: float | None = None


class VisconBuilder(datasets.GeneratorBasedBuilder):
    """Every VisCon config, read from generation records and the engine cache."""

    BUILDER_CONFIG_CLASS = VisconConfig
    BUILDER_CONFIGS = [
        VisconConfig(name=name, version=datasets.Version(__version__), description=_description(name))
        for name in ALL_CONFIGS
    ]
    DEFAULT_CONFIG_NAME = DEFAULT_CONFIG

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description=self.config.description,
            features=features_for(self.config.name),
            homepage="https://github.com/viscon-hub/viscon-hub",
        )

    def _split_generators(self, dl_manager):
        if not self.config.generations:
            raise ValueError(
                "VisconBuilder needs generations=<the output folder of `viscon generate`>, e.g. "
                "VisconBuilder(config_name='leaky', generations='viscon-work/generations')"
            )
        return [
            datasets.SplitGenerator(name=datasets.Split.TRAIN, gen_kwargs={"split": "train"}),
            datasets.SplitGenerator(name=datasets.Split.TEST, gen_kwargs={"split": "test"}),
        ]

    def _merger(self) -> Merger:
        """The merger of this build: made on first use, shared by every split."""
        merger = getattr(self, "_viscon_merger", None)
        if merger is not None:
            return merger
        dedup = DedupConfig()
        changes = {}
        if self.config.dedup_model:
            changes["model"] = self.config.dedup_model
        if self.config.dedup_threshold is not None:
            changes["threshold"] = self.config.dedup_threshold
        if changes:
            from dataclasses import replace

            dedup = replace(dedup, **changes)
        self._viscon_merger = Merger(
            generations=self.config.generations,
            modes=(config_mode(self.config.name),),
            cache=self.config.cache,
            extra_caches=tuple(self.config.extra_caches),
            merge=MergeConfig(test_fraction=self.config.test_fraction, dedup=dedup),
            cache_only=True,
            image_store=self.config.image_store,
            per_image=config_mix(self.config.name) is None,
        )
        return self._viscon_merger

    def _generate_examples(self, split: str):
        merger = self._merger()
        try:
            for _config, row_split, rows in merger.iter_rows((self.config.name,)):
                if row_split != split:
                    continue
                for row in rows:
                    yield row["id"], row
        finally:
            merger.close()  # the cache reopens if the next split needs it
