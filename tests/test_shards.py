"""Shard reading: gzip-compressed shards, damaged tars keeping every complete sample, retries only for
what can be transient, and bad samples that say what they hold."""

import gzip
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipelines import shards
from data_pipelines.captions import CaptionPipeline, DataError
from data_pipelines.shards import ShardError, index_tar, open_shard
from data_pipelines.tokenizers import ToyWordTokenizer
from data_pipelines.writer import ShardWriter, encode_image, write_caption_shards

TOK = ToyWordTokenizer(512)


def pipeline(sources, **kw):
    args = dict(tokenizer=TOK, seq_len=24, rows=1, image_budget=1, image_size=28, tokens_per_image=4,
                shuffle=False, train=False, epochs=1)
    return CaptionPipeline(sources, **{**args, **kw})


def drain_keys(p):
    keys = []
    while True:
        try:
            keys.append(p.next_sample()[0])
        except StopIteration:
            return keys


def pictures(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(f"{i:04d}", Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)), f"caption {i}")
            for i in range(n)]


# ---------------------------------------------------------------- gzip

@pytest.mark.parametrize("suffix", [".tgz", ".tar.gz"])
def test_gzip_shards_read_like_plain_tars(tmp_path, suffix):
    (plain,) = write_caption_shards(pictures(5), str(tmp_path / "s-%d.tar"), 10)
    packed = tmp_path / f"s-0{suffix}"
    packed.write_bytes(gzip.compress(open(plain, "rb").read()))
    want = pipeline(plain)
    got = pipeline(str(packed), cache_dir=str(tmp_path / "cache"))
    assert drain_keys(got) == drain_keys(pipeline(plain)) == [f"{i:04d}" for i in range(5)]
    for a, b in zip(pipeline(plain), pipeline(str(packed), cache_dir=str(tmp_path / "cache"))):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert got.skip_counts() == {} and want.skip_counts() == {}
    assert len(list((tmp_path / "cache").glob("*.tar"))) == 1  # decompressed once, then reused


def test_a_cut_gzip_shard_keeps_the_samples_before_the_damage(tmp_path):
    (plain,) = write_caption_shards(pictures(8), str(tmp_path / "s-%d.tar"), 10)
    data = gzip.compress(open(plain, "rb").read())
    (tmp_path / "cut.tgz").write_bytes(data[: len(data) * 2 // 3])
    index = open_shard(str(tmp_path / "cut.tgz"), cache_dir=str(tmp_path / "cache"))
    assert index.truncated and 1 <= len(index.samples) < 8
    assert [r.key for r in index.samples] == [f"{i:04d}" for i in range(len(index.samples))]
    p = pipeline(str(tmp_path / "cut.tgz"), cache_dir=str(tmp_path / "cache"), max_skip_fraction=1.0)
    assert len(drain_keys(p)) == len(index.samples) and p.skip_counts() == {"truncated_shard": 1}
    (tmp_path / "junk.tgz").write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    with pytest.raises(ShardError, match="not a readable gzip"):
        open_shard(str(tmp_path / "junk.tgz"), cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------- damaged tars

@pytest.fixture()
def four_samples(tmp_path):
    """A tar of 4 samples (a 700-byte .jpg and a 6-byte .txt each) and its members' offsets."""
    with ShardWriter(str(tmp_path / "d-%d.tar"), 10) as w:
        for i in range(4):
            w.write(f"k{i}", {"jpg": bytes([i + 1]) * 700, "txt": f"text {i}".encode()})
    path = tmp_path / "d-0.tar"
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    return path, path.read_bytes(), members


@pytest.mark.parametrize("where, kept, truncated", [
    ("whole", 4, False),
    ("end_of_last_member", 4, True),   # cut where the end-of-archive blocks start: every sample is whole
    ("in_the_next_header", 3, True),   # tarfile ends quietly here; it must still count as damage
    ("in_the_first_member_data", 3, True),  # the last complete sample (k2) is kept
    ("in_the_padding", 3, True),       # k2's caption is complete, only its block padding is cut
    ("in_the_second_member_data", 3, True),  # k3 lost part of its caption: dropped
])
def test_damaged_tar_keeps_every_complete_sample(tmp_path, four_samples, where, kept, truncated):
    path, raw, members = four_samples
    k2_txt, k3_jpg, k3_txt = members[5], members[6], members[7]
    cut = {"whole": len(raw), "end_of_last_member": k3_txt.offset_data + 512,
           "in_the_next_header": k3_jpg.offset + 100, "in_the_first_member_data": k3_jpg.offset_data + 300,
           "in_the_padding": k2_txt.offset_data + 100,
           "in_the_second_member_data": k3_txt.offset_data + 3}[where]  # 3 of its 6 bytes
    damaged = tmp_path / "cut.tar"
    damaged.write_bytes(raw[:cut])
    index = index_tar(str(damaged), str(damaged))
    assert [r.key for r in index.samples] == [f"k{i}" for i in range(kept)]
    assert index.truncated is truncated
    assert all(sorted(r.members()) == ["jpg", "txt"] for r in index.samples)


# ---------------------------------------------------------------- retries

@pytest.fixture()
def sleeps(monkeypatch):
    calls = []
    monkeypatch.setattr(shards.time, "sleep", calls.append)
    return calls


def test_missing_files_and_garbage_are_not_retried(tmp_path, sleeps):
    with pytest.raises(ShardError, match="no such shard") as e:
        open_shard(str(tmp_path / "gone.tar"), cache_dir=str(tmp_path / "c"))
    assert "attempts" not in str(e.value)
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar" * 100)
    with pytest.raises(ShardError, match="not a readable tar"):
        open_shard(str(tmp_path / "garbage.tar"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ShardError, match="a folder"):
        open_shard(str(tmp_path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ShardError, match="command failed \\(127\\)"):  # the command does not exist
        open_shard("pipe:no-such-command-owl-jax", cache_dir=str(tmp_path / "c"))
    assert sleeps == []


def test_transient_failures_are_retried(tmp_path, sleeps):
    with pytest.raises(ShardError, match="after 3 attempts"):
        open_shard("pipe:exit 3", cache_dir=str(tmp_path / "c"), retry_delay=0.01)
    assert sleeps == [0.01, 0.02]


# ---------------------------------------------------------------- what a bad sample holds

def test_a_sample_without_caption_says_which_members_it_has(tmp_path, caplog):
    """webdataset's own test shards are classification data (`.cls` + image): not caption samples."""
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    with ShardWriter(str(tmp_path / "cls-%d.tar"), 10) as w:
        for i in range(3):
            w.write(f"n{i}", {"cls": b"7", "png": png.getvalue()})
        w.write("ok", {"jpg": encode_image(Image.new("RGB", (8, 8))), "txt": b"a caption"})
    p = pipeline(str(tmp_path / "cls-0.tar"), max_skip_fraction=1.0)
    with caplog.at_level("WARNING"):
        assert drain_keys(p) == ["ok"]
    assert p.skip_counts() == {"missing_caption": 3}
    assert "no .txt member; found .cls, .png" in caplog.text
    with ShardWriter(str(tmp_path / "only-%d.tar"), 10) as w:
        w.write("n0", {"cls": b"7", "png": png.getvalue()})
    with pytest.raises(DataError, match=r"missing_caption.*found \.cls, \.png"):
        for _ in pipeline(str(tmp_path / "only-0.tar"), epochs=None):
            pass
