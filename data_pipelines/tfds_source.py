"""Prepared TFDS image-caption datasets as a caption-pipeline source, without TensorFlow.

A dataset that `tensorflow-datasets` has prepared in the `array_record` format is random-access
(`tfds.data_source`), which is exactly what `CaptionPipeline` needs: its order, resume and process split
are functions of (source, position) only. A source string in `data.train_paths`

    tfds:PATH_OR_NAME[?split=train&data_dir=DIR&image=KEY&caption=KEY&shard_size=10000]

names the prepared dataset by its folder (`.../coco_like/1.0.0`, the one holding `dataset_info.json`)
or by name (with `data_dir`). `image` and `caption` are the top-level features to use (default: the
dataset's only `Image` and only `Text` feature). `expand_sources` splits the split into virtual shards
of `shard_size` records (`...#START-STOP`), so window shuffling and the process split work as they do for
tar shards. Images are read undecoded (`SkipDecoding`) and go through the same decoding, bad-data checks
and CLIP preprocessing as shard images.

Needs the `tfds` extra (`pip install owl-jax[tfds]`: `tensorflow-datasets` and `array_record`; TensorFlow
itself is not needed to read). Opened datasets are cached per process (workers included), keyed by the
source string.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any
from urllib.parse import parse_qs

PREFIX = "tfds:"
DEFAULT_SHARD_SIZE = 10_000
_OPTIONS = ("split", "data_dir", "image", "caption", "shard_size")


class TfdsSourceError(ValueError):
    """A tfds: source that cannot be opened or used (missing package, dataset, split or feature)."""


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    dataset: str                 # a prepared dataset folder, or a name (`name`, `name/config`, `name:1.0.0`)
    split: str = "train"
    data_dir: str = ""
    image: str = ""              # "" = the only Image feature
    caption: str = ""            # "" = the only Text feature
    shard_size: int = DEFAULT_SHARD_SIZE

    @classmethod
    def parse(cls, source: str) -> tuple[TfdsSpec, tuple[int, int] | None]:
        """(spec, record range of a virtual shard or None) of `tfds:...[?...][#START-STOP]`."""
        if not source.startswith(PREFIX):
            raise TfdsSourceError(f"not a tfds source: {source!r}")
        body, _, fragment = source[len(PREFIX):].partition("#")
        dataset, _, query = body.partition("?")
        options = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        unknown = sorted(set(options) - set(_OPTIONS))
        if not dataset or unknown:
            raise TfdsSourceError(f"{source!r}: expected tfds:PATH_OR_NAME[?{'&'.join(o + '=...' for o in _OPTIONS)}]"
                                  + (f"; unknown option(s) {unknown}" if unknown else ""))
        try:
            shard_size = int(options.pop("shard_size", DEFAULT_SHARD_SIZE))
            span = None
            if fragment:
                start, stop = (int(x) for x in fragment.split("-"))
                span = (start, stop)
        except ValueError:
            raise TfdsSourceError(f"{source!r}: shard_size and #START-STOP must be integers") from None
        if shard_size < 1:
            raise TfdsSourceError(f"{source!r}: shard_size must be positive")
        return cls(dataset, shard_size=shard_size, **options), span

    def source(self) -> str:
        """The canonical source string (without a range)."""
        defaults = TfdsSpec(self.dataset)
        query = "&".join(f"{k}={getattr(self, k)}" for k in _OPTIONS if getattr(self, k) != getattr(defaults, k))
        return f"{PREFIX}{self.dataset}" + (f"?{query}" if query else "")


@dataclasses.dataclass(frozen=True)
class OpenedSource:
    data: Any        # the TFDS data source: len() and [i] -> {feature: value}
    image: str
    caption: str
    name: str        # dataset full name, for sample keys


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise TfdsSourceError("tfds: sources need the tfds extra: pip install 'owl-jax[tfds]' "
                              "(tensorflow-datasets and array_record; TensorFlow is not needed)") from None
    return tfds


def _only(features: dict, kind: type, given: str, what: str, source: str) -> str:
    if given:
        if given not in features:
            raise TfdsSourceError(f"{source}: no feature {given!r}; the dataset has {sorted(features)}")
        return given
    found = [k for k, f in features.items() if isinstance(f, kind)]
    if len(found) != 1:
        raise TfdsSourceError(f"{source}: {len(found)} top-level {what} features ({found}) among "
                              f"{sorted(features)}; pick one with ?{what.lower()}=KEY")
    return found[0]


@functools.lru_cache(maxsize=8)
def open_source(source: str) -> OpenedSource:
    """The opened dataset of a tfds: source string (range ignored), cached per process."""
    spec, _ = TfdsSpec.parse(source)
    tfds = _import_tfds()
    try:
        if os.path.isfile(os.path.join(spec.dataset, "dataset_info.json")):
            builder = tfds.builder_from_directory(spec.dataset)
        else:
            builder = tfds.builder(spec.dataset, data_dir=spec.data_dir or None)
        features = dict(builder.info.features.items())
    except (OSError, ValueError, KeyError, TypeError) as e:  # DatasetNotFoundError is a ValueError
        raise TfdsSourceError(f"{source}: cannot open the prepared dataset: {type(e).__name__}: {e}") from None
    image = _only(features, tfds.features.Image, spec.image, "Image", source)
    caption = _only(features, tfds.features.Text, spec.caption, "Caption", source)
    if spec.split not in builder.info.splits:
        raise TfdsSourceError(f"{source}: no split {spec.split!r}; the dataset has {sorted(builder.info.splits)}")
    try:
        data = builder.as_data_source(split=spec.split, decoders={image: tfds.decode.SkipDecoding()})
    except (OSError, ValueError, KeyError, NotImplementedError) as e:  # e.g. prepared as tfrecord only
        raise TfdsSourceError(f"{source}: cannot read split {spec.split!r} as a data source (is it prepared as "
                              f"array_record?): {type(e).__name__}: {e}") from None
    return OpenedSource(data, image, caption, builder.info.full_name)


def expand(source: str) -> list[str]:
    """Virtual shards `tfds:...#START-STOP` covering the split, `shard_size` records each."""
    spec, span = TfdsSpec.parse(source)
    if span is not None:
        return [source]
    n = len(open_source(spec.source()).data)
    base = spec.source()
    return [f"{base}#{start}-{min(start + spec.shard_size, n)}" for start in range(0, n, spec.shard_size)]


def shard_records(source: str) -> tuple[str, str, range]:
    """(canonical source, dataset name, record range) of a virtual shard."""
    spec, span = TfdsSpec.parse(source)
    base = spec.source()
    opened = open_source(base)
    n = len(opened.data)
    start, stop = span if span is not None else (0, n)
    if not 0 <= start <= stop <= n:
        raise TfdsSourceError(f"{source}: records {start}-{stop} are outside the split's {n}")
    return base, opened.name, range(start, stop)


def read_example(source: str, index: int) -> tuple[bytes, Any]:
    """(encoded image bytes, caption as stored: bytes or str) of record `index`."""
    opened = open_source(source)
    try:
        example = opened.data[index]
    except Exception as e:  # whatever the record parser raises: the pipeline counts it as a read error
        raise OSError(f"{source}: record {index}: {type(e).__name__}: {e}") from e
    return example[opened.image], example[opened.caption]
