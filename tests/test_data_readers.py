"""Real-data readers: tar shards, image folders, embeddings, make_source and batches."""

import io
import json
import os
import shutil
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from unclip_jax.config import ConfigError
from unclip_jax.data import DataError, batches, default_data_config, first_examples, make_source
from unclip_jax.data import embeddings, folders, images, shapes, tar_shards


def _encode(array, fmt):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def _image(i, fmt="PNG", shape=(24, 36)):
    """A small image whose top-left pixel encodes i (lossless formats)."""
    a = np.random.default_rng(i).integers(0, 255, (*shape, 3), dtype=np.uint8)
    return _encode(a, fmt)


def _write_tar(path, samples):
    """samples: [(key, {ext: bytes})]."""
    with tarfile.open(path, "w") as tf:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """7 shards × 8 samples; known damage. Returns (dir, set of valid keys)."""
    d = tmp_path_factory.mktemp("shards")
    valid = set()
    fmts = ("PNG", "JPEG", "WEBP")
    for s in range(7):
        samples = []
        for j in range(8):
            key = f"{s:02d}{j:03d}"
            fmt = fmts[(s + j) % 3]
            files = {fmt.lower().replace("jpeg", "jpg"): _image(s * 8 + j, fmt),
                     "txt": f"caption {key}".encode(), "json": b"{}"}
            if j == 3:
                files[fmt.lower().replace("jpeg", "jpg")] = b"not an image"  # corrupt
            elif j == 5:
                del files["txt"]  # incomplete
            else:
                valid.add(key)
            samples.append((key, files))
        _write_tar(d / f"{s:05d}.tar", samples)
    # Shard 4: cut in the middle of sample 6's image; samples 0-5 survive (6, 7 lost).
    data = (d / "00004.tar").read_bytes()
    with tarfile.open(d / "00004.tar") as tf:
        cut = next(m for m in tf.getmembers() if m.name.startswith("04006.")).offset_data + 10
    (d / "00004.tar").write_bytes(data[:cut])
    valid -= {"04006", "04007"}
    # Shard 5: cut exactly after its last member (no end-of-archive blocks): counted as
    # truncated, but every sample is whole and kept.
    with tarfile.open(d / "00005.tar") as tf:
        members = tf.getmembers()
    end = members[-1].offset_data + ((members[-1].size + 511) // 512) * 512
    (d / "00005.tar").write_bytes((d / "00005.tar").read_bytes()[:end])
    # Shard 6: garbage in the header of sample 4's first member (bad checksum): samples
    # 0-2 are kept (3 is corrupt), everything after the bad header is lost.
    data = bytearray((d / "00006.tar").read_bytes())
    with tarfile.open(d / "00006.tar") as tf:
        bad = next(m for m in tf.getmembers() if m.name.startswith("06004.")).offset
    data[bad + 148:bad + 156] = b"garbage!"
    (d / "00006.tar").write_bytes(bytes(data))
    valid -= {f"0600{j}" for j in range(4, 8)}
    return str(d), valid


def test_tar_reader_skips_and_counts_damage(shard_dir):
    path, valid = shard_dir
    source = tar_shards.TarShardSource(path, image_size=16, shuffle_buffer=1,
                                       shuffle_shards=False, num_epochs=1)
    examples = list(source)
    keys = [e["key"] for e in examples]
    assert keys == sorted(valid)  # stream order without shuffling
    assert examples[0]["image"].shape == (16, 16, 3) and examples[0]["image"].dtype == np.uint8
    assert examples[0]["caption"] == f"caption {keys[0]}"
    assert source.stats == {"yielded": len(valid), "skipped_corrupt": 7,
                            "skipped_incomplete": 6, "truncated_shards": 3,
                            "unreadable_shards": 0}


def test_tar_resumes_at_every_position_of_a_damaged_stream(shard_dir):
    path, valid = shard_dir
    source = tar_shards.TarShardSource(path, image_size=8, shuffle_buffer=1,
                                       shuffle_shards=False, num_epochs=1)
    full = [e["key"] for e in source]
    final = dict(source.stats)
    for cut in range(len(full) + 1):
        it = source.iterate()
        for _ in range(cut):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        resumed = source.iterate()
        resumed.set_state(state)
        assert [e["key"] for e in resumed] == full[cut:], cut
        assert resumed.stats == final, cut


def test_tar_processes_split_shards_disjoint_and_complete(shard_dir):
    path, valid = shard_dir
    seen = []
    for p in range(4):  # 7 shards: 2, 2, 2, 1
        source = tar_shards.TarShardSource(path, image_size=8, shuffle_buffer=5, num_epochs=1,
                                           seed=3, process_index=p, process_count=4)
        assert source.local_shards == source.shards[p::4]
        seen.append({e["key"] for e in source})
    for a in range(4):
        for b in range(a + 1, 4):
            assert not seen[a] & seen[b]
    assert set().union(*seen) == valid
    with pytest.raises(DataError, match="gets no shard"):
        tar_shards.TarShardSource(path, process_index=7, process_count=8)


def test_tar_shuffles_and_resumes_exactly(shard_dir):
    path, valid = shard_dir
    source = tar_shards.TarShardSource(path, image_size=8, crop="random", shuffle_buffer=7,
                                       num_epochs=3, seed=11)
    full = list(source.iterate(11))
    assert len(full) == 3 * len(valid)
    first_epoch = [e["key"] for e in full[:len(valid)]]
    assert first_epoch != sorted(first_epoch)  # shuffled
    assert [e["key"] for e in list(source.iterate(12))] != [e["key"] for e in full]
    for cut in (0, 1, 9, len(valid) - 1, len(valid) + 4, 3 * len(valid) - 1):
        it = source.iterate(11)
        for _ in range(cut):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # JSON-able
        assert len(json.dumps(state)) < 2000
        resumed = source.iterate(11)
        resumed.set_state(state)
        rest = list(resumed)
        assert [e["key"] for e in rest] == [e["key"] for e in full[cut:]]
        for a, b in zip(rest, full[cut:]):
            np.testing.assert_array_equal(a["image"], b["image"])  # same random crops too
        assert resumed.stats["truncated_shards"] == 9  # 3 per pass, counted once each


def test_tar_source_works_in_a_grain_pipeline(shard_dir):
    path, _ = shard_dir
    source = tar_shards.TarShardSource(path, image_size=8, shuffle_buffer=3)
    batch = next(iter(source.map(lambda e: e["image"].astype(np.float32) / 255.0).batch(4)))
    assert batch.shape == (4, 8, 8, 3)


def test_tar_without_decodable_pairs_fails_clearly(tmp_path):
    _write_tar(tmp_path / "a.tar", [(f"{i}", {"jpg": b"broken", "txt": b"x"}) for i in range(3)])
    (tmp_path / "b.tar").write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(DataError, match=r"no decodable image/caption pairs found in .* "
                                        r"\(checked 6 files"):
        tar_shards.TarShardSource(str(tmp_path))
    with pytest.raises(DataError, match="no .tar shards found"):
        tar_shards.TarShardSource(str(tmp_path / "a.tar").replace("a.tar", "*.tgz"))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("folder")
    (d / "sub").mkdir()
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :30] = (255, 0, 0)
    wide[:, 30:] = (0, 0, 255)
    (d / "wide.png").write_bytes(_encode(wide, "PNG"))
    (d / "wide.txt").write_text("half red, half blue")
    rgba = np.zeros((10, 10, 4), np.uint8)  # fully transparent: composited on white
    (d / "sub" / "clear.png").write_bytes(_encode(rgba, "PNG"))
    (d / "sub" / "clear.txt").write_text("nothing")
    (d / "sub" / "photo.webp").write_bytes(_image(1, "WEBP"))
    (d / "sub" / "photo.txt").write_text("a photo")
    (d / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (d / "broken.txt").write_text("broken")
    (d / "lonely.jpg").write_bytes(_image(2, "JPEG"))  # no caption
    return str(d)


def test_folder_reader(image_folder):
    source = folders.FolderSource(image_folder, image_size=16)
    assert len(source) == 4 and source.stats["missing_caption"] == 1
    keys = [os.path.splitext(os.path.relpath(p, image_folder))[0] for p, _ in source.pairs]
    assert keys == ["broken", "wide", "sub/clear", "sub/photo"]
    broken = source[0]  # undecodable: replaced by the next example, counted once
    assert broken["key"] == "wide" and source.stats["skipped_corrupt"] == 1
    source[0]
    assert source.stats["skipped_corrupt"] == 1
    wide = source[1]
    assert wide["caption"] == "half red, half blue" and wide["image"].shape == (16, 16, 3)
    # Center crop of a 3:1 image keeps its middle third: red left half, blue right half.
    assert wide["image"][8, 2, 0] > 200 and wide["image"][8, 13, 2] > 200
    np.testing.assert_array_equal(source[2]["image"], np.full((16, 16, 3), 255, np.uint8))
    # Random crops: deterministic per (seed, index) and different between indices' rngs.
    rand = folders.FolderSource(image_folder, image_size=16, crop="random", seed=1)
    np.testing.assert_array_equal(rand[1]["image"], rand[1]["image"])
    crops = {rand.example(1, rng=np.random.default_rng(s))["image"].tobytes() for s in range(8)}
    assert len(crops) > 1


def test_empty_sources_fail_with_a_clear_message(tmp_path):
    (tmp_path / "a.png").write_bytes(b"nope")
    (tmp_path / "a.txt").write_text("caption")
    with pytest.raises(DataError, match=r"no decodable image/caption pairs found in .* "
                                        r"\(checked 1 pairs"):
        folders.FolderSource(str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        folders.FolderSource(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="no readable embedding shards"):
        embeddings.EmbeddingSource(str(tmp_path), require_hidden=False)


def test_image_decoding_helpers():
    rgb = np.random.default_rng(0).integers(0, 255, (30, 20, 3), dtype=np.uint8)
    for fmt in ("PNG", "WEBP", "JPEG"):
        out = images.load_image(_encode(rgb, fmt), 12)
        assert out.shape == (12, 12, 3) and out.dtype == np.uint8
    exact = images.load_image(_encode(rgb, "PNG"), 20)  # no resize, centre crop of the rows
    np.testing.assert_array_equal(exact, rgb[5:25])
    with pytest.raises(images.CorruptImage):
        images.load_image(b"\x89PNG garbage", 8)
    with pytest.raises(ValueError, match="crop must be"):
        images.load_image(_encode(rgb, "PNG"), 8, crop="corner")


def _embedding_arrays(n, d=8, length=5, hidden=6):
    rng = np.random.default_rng(0)
    return {"img_emb": rng.normal(size=(n, d)), "text_emb": rng.normal(size=(n, d)),
            "text_hidden": rng.normal(size=(n, length, hidden)),
            "text_mask": rng.random((n, length)) < 0.7}


def test_embeddings_round_trip(tmp_path):
    arrays = _embedding_arrays(23)
    assert embeddings.write_embeddings(str(tmp_path), arrays, shard_size=2, dtype=np.float16) == 12
    assert os.path.exists(tmp_path / "img_emb" / "img_emb_11.npy")  # _10, _11 after _9
    source = embeddings.EmbeddingSource(str(tmp_path))
    assert len(source) == 23
    for i in (0, 9, 20, 22):
        ex = source[i]
        assert set(ex) == {"image_embed", "text_embed", "text_hidden", "text_mask"}
        assert ex["image_embed"].dtype == np.float32 and ex["text_mask"].dtype == bool
        np.testing.assert_allclose(ex["image_embed"], arrays["img_emb"][i], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(ex["text_hidden"], arrays["text_hidden"][i], rtol=1e-3,
                                   atol=1e-3)
        np.testing.assert_array_equal(ex["text_mask"], arrays["text_mask"][i])
    with pytest.raises(DataError, match="already holds"):
        embeddings.write_embeddings(str(tmp_path), arrays)
    # For grain workers: the pickle names the shard files and reopens their maps, it carries
    # no array (its size grows with the length of the paths, not with the data).
    pickled = pickle.dumps(source)
    assert b"numpy" not in pickled
    copy = pickle.loads(pickled)
    np.testing.assert_array_equal(copy[20]["text_hidden"], source[20]["text_hidden"])


def test_embeddings_damage_is_counted(tmp_path):
    arrays = _embedding_arrays(9)
    arrays["img_emb"][4, 1] = np.nan
    embeddings.write_embeddings(str(tmp_path), arrays, shard_size=3)
    (tmp_path / "text_hidden" / "text_hidden_2.npy").write_bytes(b"corrupt")
    source = embeddings.EmbeddingSource(str(tmp_path))
    assert len(source) == 6 and source.stats["corrupt_files"] == 1
    np.testing.assert_allclose(source[4]["image_embed"], arrays["img_emb"][5], rtol=1e-6)
    assert source.stats["skipped_corrupt"] == 1
    only = tmp_path / "plain"
    embeddings.write_embeddings(str(only), {"image_embed": arrays["img_emb"],
                                            "text_embed": arrays["text_emb"]})
    with pytest.raises(DataError, match="require_hidden=False"):
        embeddings.EmbeddingSource(str(only))
    assert set(embeddings.EmbeddingSource(str(only), require_hidden=False)[0]) == {
        "image_embed", "text_embed"}
    # text_hidden/ without text_mask/: named as missing, or read without either when allowed.
    half = tmp_path / "half"
    embeddings.write_embeddings(str(half), arrays)
    shutil.rmtree(half / "text_mask")
    with pytest.raises(DataError, match="no text_mask/ shards"):
        embeddings.EmbeddingSource(str(half))
    source = embeddings.EmbeddingSource(str(half), require_hidden=False)
    assert len(source) == 9 and set(source[0]) == {"image_embed", "text_embed"}


def test_make_source_for_every_kind(shard_dir, image_folder, tmp_path):
    cfg = default_data_config("shapes")
    cfg.image_size, cfg.num_examples, cfg.num_eval_examples = 32, 100, 10
    src = make_source(cfg, split="train")
    assert isinstance(src, shapes.ShapesSource) and len(src) == 100
    assert src[0]["image"].shape == (32, 32, 3)
    assert make_source(cfg, split="eval").split == "test"
    assert make_source(cfg, split="heldout").split == "heldout"
    tar = default_data_config("tar")
    tar.path, tar.image_size, tar.shuffle_buffer = shard_dir[0], 8, 4
    tar_source = make_source(tar, split="train", process_index=1, process_count=2)
    assert tar_source.local_shards == tar_source.shards[1::2]
    with pytest.raises(ConfigError, match="data.eval_path is empty"):
        make_source(tar, split="eval")
    # The first examples of a stream (no len, no [i]: sample grids read them so) and of an
    # indexed source, never more than it has.
    firsts = first_examples(tar_source, 3)
    assert len(firsts) == 3 and all(e["image"].shape == (8, 8, 3) for e in firsts)
    assert len(first_examples(src, 1000)) == 100
    assert first_examples(src, 2)[1]["caption"] == src[1]["caption"]
    folder = default_data_config("folder")
    folder.path = image_folder
    assert len(make_source(folder, split="train")) == 4
    embeddings.write_embeddings(str(tmp_path), _embedding_arrays(5))
    emb = default_data_config("embeddings")
    emb.path = str(tmp_path)
    assert len(make_source(emb, split="train")) == 5
    with pytest.raises(ConfigError, match="unknown data kind"):
        default_data_config("parquet")
    bad = default_data_config("shapes")
    bad.crop = "corner"
    with pytest.raises(ConfigError, match="data.crop"):
        make_source(bad, split="train")
    assert set(default_data_config("tar")) == set(default_data_config("shapes"))


def test_random_access_batches_resume_and_split_exactly():
    source = shapes.ShapesSource("test", 10, image_size=16)
    run = batches(source, 4, seed=5)
    steps = [next(run) for _ in range(6)]  # 24 examples: crosses two epoch boundaries
    assert steps[0]["image"].shape == (4, 16, 16, 3) and len(steps[0]["caption"]) == 4
    resumed = batches(source, 4, seed=5, start_step=3)
    for want in steps[3:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        assert got["caption"] == want["caption"]
    assert resumed.get_state()["step"] == 6
    # Each epoch visits every example once; epochs are shuffled differently.
    order = [batches(source, 1, seed=5, start_step=s).indices(s)[0] for s in range(20)]
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:]) == list(range(10))
    assert order[:10] != order[10:] and order[:10] != list(range(10))
    # Two processes: disjoint halves of the global batch, together the 1-process stream.
    for step in range(4):
        one = batches(source, 4, seed=5, process_count=1).indices(step * 2) + \
            batches(source, 4, seed=5, process_count=1).indices(step * 2 + 1)
        halves = [batches(source, 4, seed=5, process_index=p, process_count=2).indices(step)
                  for p in range(2)]
        assert halves[0] + halves[1] == one
    finite = batches(source, 3, seed=0, num_epochs=1)
    assert len(list(finite)) == 3


def test_stream_batches_resume_exactly(shard_dir):
    path, _ = shard_dir
    source = tar_shards.TarShardSource(path, image_size=8, shuffle_buffer=6, num_epochs=2)
    run = batches(source, 5, seed=2)
    steps = [next(run) for _ in range(10)]
    state = None
    it = batches(source, 5, seed=2)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    by_state = batches(source, 5, seed=2, state=state)
    by_replay = batches(source, 5, seed=2, start_step=4)
    for want in steps[4:]:
        for resumed in (by_state, by_replay):
            got = next(resumed)
            assert got["key"] == want["key"]
            np.testing.assert_array_equal(got["image"], want["image"])
