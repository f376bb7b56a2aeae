"""Prepared TFDS datasets (array_record, read without TensorFlow) as a caption-pipeline source: a tiny
dataset is built on the fly; samples, virtual shards, bad records and workers. Skipped without the
`tfds` extra."""

import io

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")

from data_pipelines import images as image_ops
from data_pipelines import tfds_source
from data_pipelines.captions import CaptionPipeline
from data_pipelines.shards import expand_sources
from data_pipelines.tokenizers import ToyWordTokenizer

TOK = ToyWordTokenizer(512)
N = 12  # good records; then one corrupt image and one empty caption


def colour(i):
    return ((37 * i) % 256, (90 + 53 * i) % 256, (200 + 71 * i) % 256)


def png(i):
    buf = io.BytesIO()
    Image.new("RGB", (20 + i, 16), colour(i)).save(buf, "PNG")
    return buf.getvalue()


def examples():
    for i in range(N):
        yield f"{i:03d}", {"image": png(i), "caption": f"picture number {i}", "id": i}
    yield "bad_image", {"image": b"\x89PNG\r\n\x1a\n not a png", "caption": "broken picture", "id": N}
    yield "bad_caption", {"image": png(0), "caption": "  ", "id": N + 1}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """A prepared array_record dataset (records in key order), built with tfds' own writer."""

    class TinyCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="png"), "caption": tfds.features.Text(),
                "id": tfds.features.Scalar(np.int64)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield from examples()

    builder = TinyCaptions(data_dir=str(tmp_path_factory.mktemp("tfds")), file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)


def drain(p):
    out = {}
    while True:
        try:
            key, pixels, tokens, weighted = p.next_sample()
        except StopIteration:
            return out
        out[key] = (TOK.decode([int(t) for t, w in zip(tokens, weighted) if w and t != TOK.eos_id]), pixels)


def pipeline(source, **kw):
    args = {"tokenizer": TOK, "seq_len": 24, "rows": 2, "image_budget": 2, "image_size": 56,
            "tokens_per_image": 9, "shuffle": False, "train": False, "epochs": 1}
    return CaptionPipeline(source, **{**args, **kw})


def test_records_become_caption_samples_with_bad_ones_counted(dataset_dir):
    source = f"tfds:{dataset_dir}?shard_size=5"
    assert expand_sources(source) == [f"{source}#0-5", f"{source}#5-10", f"{source}#10-14"]
    p = pipeline(source)
    samples = drain(p)
    assert p.state()["skipped"] == {"corrupt_image": 1, "empty_caption": 1}
    assert set(samples) == {f"tiny_captions/1.0.0/{i}" for i in range(N)}  # key = dataset / record number
    for i in range(N):
        text, pixels = samples[f"tiny_captions/1.0.0/{i}"]
        assert text == f"picture number {i}"
        expected = (np.asarray(colour(i), np.float32) / 255.0 - image_ops.CLIP_MEAN) / image_ops.CLIP_STD
        np.testing.assert_allclose(pixels, np.broadcast_to(expected, pixels.shape), atol=1e-5)


def test_workers_and_resume_match_inline(dataset_dir):
    source = f"tfds:{dataset_dir}?shard_size=4"
    # 2 of the 14 records are bad, above the default limit, which is checked when epoch 0 ends
    kw = dict(shuffle=True, train=True, epochs=None, max_skip_fraction=0.5)
    inline = pipeline(source, **kw)
    expected = [next(inline) for _ in range(8)]  # crosses the epoch boundary
    workers = pipeline(source, num_workers=1, **kw)
    try:
        got = [next(workers) for _ in range(3)]
    finally:
        workers.close()
    resumed = pipeline(source, state=workers.state(), **kw)
    got += [next(resumed) for _ in range(5)]
    for a, b in zip(expected, got):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_source_errors_are_clear(dataset_dir):
    with pytest.raises(tfds_source.TfdsSourceError, match=r"no feature 'text'; the dataset has \['caption', 'id', 'image'\]"):
        pipeline(f"tfds:{dataset_dir}?caption=text")
    with pytest.raises(tfds_source.TfdsSourceError, match="no split 'validation'"):
        pipeline(f"tfds:{dataset_dir}?split=validation")
    with pytest.raises(tfds_source.TfdsSourceError, match="unknown option"):
        pipeline(f"tfds:{dataset_dir}?spilt=train")
    with pytest.raises(tfds_source.TfdsSourceError, match="cannot open the prepared dataset"):
        pipeline(f"tfds:{dataset_dir}/nothing_here")
