"""Stage-2 instruction pipeline: batch contract, answer-only loss, text and image samples in one batch with
the right image slots and pixels, mixture weights, exact resume (padded and packed), process split, bad
records counted per reason, the skip limit, and the micro-batched image layout."""

import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines import images as image_ops
from data_pipelines.instructions import DataError, InstructionPipeline, InstructionSource
from data_pipelines.tokenizers import ToyWordTokenizer

TOK = ToyWordTokenizer(512)
TPI, SIZE = 9, 56


def colour(i):
    return ((37 * i) % 256, (90 + 53 * i) % 256, (200 + 71 * i) % 256)


def write_json(path, records):
    path.write_text(json.dumps(records))
    return str(path)


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def llava(images, answer="It is a colour."):
    question = "<image>\n" * len(images) + "What colour is this?"
    return {"image": list(images), "conversations": [{"from": "human", "value": question},
                                                     {"from": "gpt", "value": answer}]}


def alpaca(i):
    return {"instruction": f"Say number {i}", "input": "", "output": f"number {i} it is"}


def sharegpt(q, a, speaker="gpt"):
    return {"conversations": [{"from": "human", "value": q}, {"from": speaker, "value": a}]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """llava source (10 one-image + 4 two-image records, each image its own solid colour) and an alpaca
    text-only source (22 records)."""
    d = tmp_path_factory.mktemp("instr")
    (d / "img").mkdir()
    colours, records, n = {}, [], 0
    for count in [1] * 10 + [2] * 4:
        names = []
        for _ in range(count):
            name = f"c{n:03d}.png"
            Image.new("RGB", (8, 6), colour(n)).save(d / "img" / name)
            colours[name], n = colour(n), n + 1
            names.append(name)
        records.append(llava(names))
    vis = InstructionSource("vis", write_json(d / "llava.json", records), "llava", image_root=str(d / "img"))
    text = InstructionSource("text", write_jsonl(d / "alpaca.jsonl", [alpaca(i) for i in range(22)]), "alpaca")
    return {"sources": [vis, text], "colours": colours, "records": {"vis": records}, "dir": d}


def pipeline(sources, **kw):
    args = dict(tokenizer=TOK, seq_len=128, rows=4, image_budget=4, image_size=SIZE, tokens_per_image=TPI,
                seed=0, train=False)
    args.update(kw)
    return InstructionPipeline(sources, **args)


def clip(rgb):
    return (np.asarray(rgb, np.float32) / 255.0 - image_ops.CLIP_MEAN) / image_ops.CLIP_STD


def image_runs(tokens_row):
    neg = np.flatnonzero(tokens_row < 0)
    return [int(s) for s in neg if s == 0 or tokens_row[s - 1] >= 0]


def expected_images(p, data, row):
    """Image file names of a row of the last batch, in position order."""
    out = []
    for info in sorted((i for i in p.last_batch if i.row == row), key=lambda i: i.start):
        if info.source == "vis":
            out += data["records"]["vis"][info.record]["image"]
    return out


def check_images(p, data, batch, micro_batches=1, offset=0):
    """Every image run points to its own 9 consecutive visual tokens, whose pixel row holds its colour."""
    used = set()
    for r in range(batch["tokens"].shape[0]):
        names = expected_images(p, data, r)
        starts = image_runs(batch["tokens"][r])
        assert len(starts) == len(names)
        assert ((batch["image_index"][r] >= 0) == (batch["tokens"][r] < 0)).all()
        for s, name in zip(starts, names):
            idx = batch["image_index"][r, s:s + TPI]
            np.testing.assert_array_equal(idx, idx[0] + np.arange(TPI))
            assert (idx[0] - offset) % TPI == 0
            pixel_row = (idx[0] - offset) // TPI * micro_batches + r % micro_batches
            assert pixel_row not in used
            used.add(pixel_row)
            np.testing.assert_allclose(batch["pixel_values"][pixel_row], np.broadcast_to(clip(data["colours"][name]),
                                       (SIZE, SIZE, 3)), atol=0.02)
    return used


@pytest.mark.parametrize("packing", [False, True])
def test_batch_contract(data, packing):
    batch = next(pipeline(data["sources"], packing=packing))
    assert set(batch) == {"tokens", "targets", "loss_mask", "positions", "segment_ids", "pixel_values", "image_index"}
    for k in ("tokens", "targets", "positions", "segment_ids", "image_index"):
        assert batch[k].shape == (4, 128) and batch[k].dtype == np.int32, k
    assert batch["loss_mask"].shape == (4, 128) and batch["loss_mask"].dtype == bool
    assert batch["pixel_values"].shape == (4, SIZE, SIZE, 3) and batch["pixel_values"].dtype == np.float32
    assert not batch["loss_mask"][batch["segment_ids"] == 0].any()
    json.dumps(pipeline(data["sources"]).state())


@pytest.mark.parametrize("packing", [False, True])
def test_loss_only_on_answers(tmp_path, packing):
    convs = [sharegpt("first question here", "first answer words"),
             {"conversations": [{"from": "human", "value": "q one"}, {"from": "gpt", "value": "a one ok"},
                                {"from": "human", "value": "q two"}, {"from": "gpt", "value": "a two fine"}]}]
    src = InstructionSource("chat", write_json(tmp_path / "c.json", convs), "sharegpt")
    p = pipeline([src], packing=packing, rows=2, epochs=1)
    batch = next(p)
    answers = {0: ["first answer words"], 1: ["a one ok", "a two fine"]}
    for info in p.last_batch:
        seg = (batch["segment_ids"][info.row] == info.segment)
        mask = batch["loss_mask"][info.row] & seg
        want = [t for a in answers[info.record] for t in TOK.encode(a) + [TOK.eos_id]]
        np.testing.assert_array_equal(batch["targets"][info.row][mask], want)
    assert batch["loss_mask"].sum() == sum(len(TOK.encode(a)) + 1 for v in answers.values() for a in v)


def test_text_and_image_samples_share_a_batch(data):
    p = pipeline(data["sources"], seed=3)
    saw_mixed = False
    for _ in range(4):
        batch = next(p)
        srcs = {i.source for i in p.last_batch}
        saw_mixed |= srcs == {"vis", "text"}
        check_images(p, data, batch)
        assert sum(i.num_images for i in p.last_batch) <= 4
        unused = np.ones(4, bool)
        unused[:sum(i.num_images for i in p.last_batch)] = False
        assert (batch["pixel_values"][unused] == 0).all()
    assert saw_mixed


def test_packed_rows_hold_text_and_images(data):
    p = pipeline(data["sources"], packing=True, seed=1)
    for _ in range(3):
        batch = next(p)
        check_images(p, data, batch)
        assert batch["segment_ids"].max() >= 2  # several samples per row
        for info in p.last_batch:
            seg = batch["segment_ids"][info.row] == info.segment
            assert batch["positions"][info.row][seg][0] == 0 and np.flatnonzero(seg)[0] == info.start


def test_mixture_weights_and_determinism(tmp_path):
    a = InstructionSource("a", write_json(tmp_path / "a.json", [alpaca(i) for i in range(10)]), "alpaca", weight=3.0)
    b = InstructionSource("b", write_json(tmp_path / "b.json", [alpaca(100 + i) for i in range(30)]), "alpaca",
                          weight=1.0)
    p = pipeline([a, b])
    assert p.epoch_length == 120 and p.draws == [90, 30]  # b makes one full pass, a nine
    order = [p.locate(g) for g in range(240)]
    for start in range(0, 240, 40):  # every stretch holds the weights to about one sample
        assert abs(sum(s == 0 for s, _ in order[start:start + 40]) - 30) <= 2
    epoch0 = order[:120]
    assert sorted(r for s, r in epoch0 if s == 1) == list(range(30))
    assert sorted(r for s, r in epoch0 if s == 0) == sorted(list(range(10)) * 9)
    assert order == [pipeline([a, b]).locate(g) for g in range(240)]
    assert order != [pipeline([a, b], seed=1).locate(g) for g in range(240)]
    assert order[:120] != order[120:]  # a new permutation every epoch
    for q in range(2):  # no process gets one source only
        share = np.mean([s == 0 for s, _ in order[q::2]])
        assert 0.6 < share < 0.9
    run = pipeline([a, b], seed=5)
    for _ in range(10):
        next(run)
    assert abs(run.state()["usable"]["a"] - 30) <= 3 and sum(run.state()["usable"].values()) == 40
    sizes = pipeline([InstructionSource("a", a.path, "alpaca"), InstructionSource("b", b.path, "alpaca")])
    assert sizes.epoch_length == 40 and sizes.draws == [10, 30]


def assert_same(a, b):
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("packing", [False, True])
def test_resume_is_exact(data, packing):
    kw = dict(packing=packing, image_budget=2, seed=7, train=True)
    p = pipeline(data["sources"], **kw)
    carried = False
    for _ in range(3):
        next(p)
        carried |= bool(p.state()["pending"])
    state = json.loads(json.dumps(p.state()))
    expected = []
    for _ in range(6):  # crosses the epoch boundary (36 samples)
        expected.append(next(p))
        carried |= bool(p.state()["pending"])
    assert carried  # deferred / leftover samples were carried across a saved state
    resumed = pipeline(data["sources"], state=state, **kw)
    for e in expected:
        assert_same(e, next(resumed))
    assert resumed.state() == p.state()


def test_state_is_refused_for_another_mixture_or_process(data):
    state = pipeline(data["sources"]).state()
    with pytest.raises(DataError, match="mixture"):
        pipeline(data["sources"], seed=1, state=state)
    with pytest.raises(DataError, match="process"):
        pipeline(data["sources"], process_index=1, num_processes=2, state=state)


def test_processes_split_an_epoch_disjointly_and_completely(data):
    seen = []
    for q in range(3):
        p = pipeline(data["sources"], process_index=q, num_processes=3, epochs=1, image_budget=2)
        mine = []
        for batch in p:
            check_images(p, data, batch, offset=q * 2 * TPI)
            mine += [i.index for i in p.last_batch]
        assert all(g % 3 == q for g in mine)
        seen.append(mine)
    flat = [g for s in seen for g in s]
    assert len(flat) == len(set(flat)) and set(flat) == set(range(36))  # deferred samples are not dropped


@pytest.mark.parametrize("packing", [False, True])
def test_resplit_between_process_counts_loses_and_repeats_nothing(data, packing):
    """2 processes -> 3 -> 1 mid-epoch (uneven progress, carried samples): over one epoch every sample
    is emitted exactly once."""
    kw = dict(epochs=1, image_budget=2, packing=packing)

    def take(p, batches):
        out = []
        for _ in range(batches):
            try:
                next(p)
            except StopIteration:
                break
            out += [i.index for i in p.last_batch]
        return out

    two = [pipeline(data["sources"], process_index=q, num_processes=2, **kw) for q in range(2)]
    seen = take(two[0], 2) + take(two[1], 1)  # uneven: process 0 is a batch ahead
    assert any(p.state()["pending"] for p in two) or not packing
    states3 = two[0].remap_states([p.state() for p in two], 3)
    three = [pipeline(data["sources"], process_index=q, num_processes=3, state=states3[q], **kw) for q in range(3)]
    seen += take(three[0], 1) + take(three[1], 2) + take(three[2], 1)
    states1 = three[0].remap_states([p.state() for p in three], 1)
    one = pipeline(data["sources"], state=states1[0], **kw)
    seen += take(one, 100)
    assert len(seen) == len(set(seen)) and set(seen) == set(range(36))
    assert one.state()["seen"] == 36


def test_bad_records_are_skipped_and_counted(tmp_path, caplog):
    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), colour(i)).save(tmp_path / "img" / f"ok{i}.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        sharegpt("hello there", "hi"), "{not json", sharegpt("who are you", "a bot", speaker="bot"),
        sharegpt(" ".join(["word"] * 200), "short answer"), sharegpt("fine?", "yes fine")])
    vis = write_json(tmp_path / "vis.json", [
        llava(["ok0.png"]), llava(["nowhere.png"]), llava(["broken.png"]), llava(["ok1.png", "ok2.png", "ok3.png"]),
        llava(["ok1.png"])])
    sources = [InstructionSource("chat", chat, "sharegpt"),
               InstructionSource("vis", vis, "llava", image_root=str(tmp_path / "img"))]
    p = pipeline(sources, image_budget=2, epochs=1, max_skip_fraction=1.0)
    with caplog.at_level("WARNING"):
        emitted = [i for _ in p for i in p.last_batch]
    assert p.state()["skipped"] == {"malformed_json": 1, "unknown_speaker": 1, "too_long": 1, "missing_image": 1,
                                    "corrupt_image": 1, "too_many_images": 1}
    assert sorted((i.source, i.record) for i in emitted) == [("chat", 0), ("chat", 4), ("vis", 0), ("vis", 4)]
    assert p.state()["seen"] == 4
    assert "chat[1] (line 2)" in caplog.text and "malformed_json" in caplog.text
    assert "vis[1]" in caplog.text and "nowhere.png" in caplog.text and "vis[2]" in caplog.text


def test_too_many_bad_records_stop_the_run(tmp_path):
    lines = [sharegpt(f"question {i}", f"answer {i}") if i % 5 == 0 else "{broken" for i in range(300)]
    src = InstructionSource("mostly_bad", write_jsonl(tmp_path / "bad.jsonl", lines), "sharegpt")
    p = pipeline([src], max_skip_fraction=0.1)
    with pytest.raises(DataError, match="max_skip_fraction"):
        for _ in range(100):
            next(p)
    assert sum(p.state()["skipped"].values()) + p.state()["seen"] >= 200


def test_a_source_without_usable_records_is_a_construction_error(tmp_path, data):
    bad = InstructionSource("junk", write_jsonl(tmp_path / "junk.jsonl", ["{x", sharegpt("a", "b", "bot")]),
                            "sharegpt")
    with pytest.raises(DataError, match="'junk'"):
        pipeline([data["sources"][1], bad])
    no_images = InstructionSource("lost", data["sources"][0].path, "llava", image_root=str(tmp_path / "nothing"))
    with pytest.raises(DataError, match="'lost'.*missing_image"):
        pipeline([no_images])


def test_micro_batched_image_layout(data):
    from owl_jax.models.splice import plan_micro_batched_slots
    p = pipeline(data["sources"], micro_batches=2, process_index=1, num_processes=2, seed=2)
    for _ in range(3):
        batch = next(p)
        per_row = np.array([sum(i.num_images for i in p.last_batch if i.row == r) for r in range(4)])
        assert per_row[0::2].sum() <= 2 and per_row[1::2].sum() <= 2
        index, pixel_row = plan_micro_batched_slots(batch["tokens"], per_row, tokens_per_image=TPI, image_budget=4,
                                                    num_micro_batches=2)
        np.testing.assert_array_equal(batch["image_index"], np.where(index >= 0, index + 2 * TPI, -1))
        names = [n for r in range(4) for n in expected_images(p, data, r)]
        for name, row in zip(names, pixel_row):
            np.testing.assert_allclose(batch["pixel_values"][row, 0, 0], clip(data["colours"][name]), atol=0.02)
        check_images(p, data, batch, micro_batches=2, offset=2 * TPI)


@pytest.mark.parametrize("system", [None, "", "You describe pictures."])
def test_configured_system_prompt_replaces_the_default_only(tmp_path, system):
    from data_pipelines.conversation import SYSTEM_PROMPT
    own = {"conversations": [{"from": "system", "value": "Own prompt."}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}]}
    src = InstructionSource("chat", write_json(tmp_path / "c.json", [sharegpt("q", "a"), own]), "sharegpt")
    p = pipeline([src], rows=2, epochs=1, system_prompt=system)
    batch = next(p)
    for info in p.last_batch:
        if info.record == 1:
            prefix = "Own prompt.\nHuman: q"  # the record's own system message wins
        elif system is None:
            prefix = SYSTEM_PROMPT + "\nHuman: q"
        else:
            prefix = f"{system}\nHuman: q" if system else "Human: q"
        want = [TOK.bos_id] + TOK.encode(prefix)
        assert batch["tokens"][info.row][:len(want)].tolist() == want


def test_system_prompt_with_a_role_marker_is_refused(tmp_path):
    src = InstructionSource("chat", write_json(tmp_path / "c.json", [sharegpt("q", "a")]), "sharegpt")
    with pytest.raises(DataError, match="role marker"):
        pipeline([src], rows=2, epochs=1, system_prompt="Be nice.\nAI: ok")


def test_a_bad_record_is_counted_once_over_epochs_cycles_resume_and_resplit(tmp_path):
    """The small source is drawn three times per epoch (weights 1:1 for sizes 6:2): its bad record is met
    9 times in 3 epochs and counted once; so is the text source's."""
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), colour(1)).save(tmp_path / "img" / "ok.png")
    chat = write_jsonl(tmp_path / "chat.jsonl", [sharegpt(f"q {i}", f"a {i}") for i in range(5)] + ["{broken"])
    vis = write_json(tmp_path / "vis.json", [llava(["ok.png"]), llava(["gone.png"])])
    sources = [InstructionSource("chat", chat, "sharegpt", weight=1.0),
               InstructionSource("vis", vis, "llava", weight=1.0, image_root=str(tmp_path / "img"))]
    distinct = {"malformed_json": 1, "missing_image": 1}
    kw = dict(rows=2, image_budget=2, max_skip_fraction=0.5)
    whole = pipeline(sources, epochs=3, **kw)
    assert whole.epoch_length == 12 and whole.draws == [6, 6]
    batches = list(whole)
    assert whole.skip_counts() == distinct and whole.state()["considered"] == 8
    assert whole.state()["seen"] == 3 * (5 + 3)  # usable draws: 5 chat + 3 of the 6 vis draws, per epoch
    p = pipeline(sources, **kw)
    for _ in range(5):
        next(p)
    resumed = pipeline(sources, state=p.state(), **kw)
    for _ in range(len(batches) - 5):
        next(resumed)
    assert resumed.skip_counts() == distinct
    two = [pipeline(sources, process_index=i, num_processes=2, **kw) for i in range(2)]
    for q in two:
        for _ in range(4):
            next(q)
    states = two[0].remap_states([q.state() for q in two], 3)
    three = [pipeline(sources, process_index=i, num_processes=3, state=states[i], **kw) for i in range(3)]
    for q in three:
        for _ in range(4):
            next(q)
    total = {}
    for q in three:
        for k, v in q.skip_counts().items():
            total[k] = total.get(k, 0) + v
    assert total == distinct


def test_the_skip_limit_is_checked_when_a_small_first_pass_ends(tmp_path):
    src = InstructionSource("chat", write_jsonl(tmp_path / "c.jsonl", [sharegpt("q", "a")] * 8 + ["{x", "{y"]),
                            "sharegpt")
    p = pipeline([src], rows=2)  # default limit 0.1: 2 of 10 are bad
    with pytest.raises(DataError, match=r"2 of 10 instruction samples were unusable .*malformed_json: chat\[\d\]"):
        for _ in range(20):
            next(p)


# --------------------------------------------------------------------------------------------------
# LLaVA's data and templates
# --------------------------------------------------------------------------------------------------

def _llava_data(d):
    """LLaVA-Pretrain (`blip_laion_cc_sbu_558k.json`: id, image in a sub-folder, the tag before or after the
    instruction) and `llava_v1_5_mix665k.json` (image and text-only entries mixed, multi-turn) records."""
    (d / "00453").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 6), colour(i)).save(d / "00453" / f"00453{i}.jpg")
    pretrain = [{"id": f"00453{i}", "image": f"00453/00453{i}.jpg", "conversations": [
        {"from": "human", "value": ("Give a brief description of the image.\n<image>" if i % 2
                                    else "<image>\nWrite a terse but informative summary of the picture.")},
        {"from": "gpt", "value": f"caption number {i} of a colour"}]} for i in range(3)]
    mix = [{"id": "a", "image": "00453/004530.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "A colour."},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Quite sure."}]},
        {"id": "b", "model": "", "conversations": [  # ShareGPT part: no image
            {"from": "human", "value": "Write one line."}, {"from": "gpt", "value": "One line."}]}]
    return (InstructionSource("pretrain", write_json(d / "blip_laion_cc_sbu_558k.json", pretrain), "llava",
                              image_root=str(d)),
            InstructionSource("mix", write_json(d / "llava_v1_5_mix665k.json", mix), "llava", image_root=str(d)),
            pretrain, mix)


@pytest.mark.parametrize("template", ["plain", "vicuna_v1"])
def test_llava_pretrain_and_mix665k_in_llava_templates(tmp_path, template):
    from data_pipelines.conversation import read_record
    from data_pipelines.templates import get_template
    from data_pipelines.tokenize import to_training_sample
    pre, mix, pre_records, mix_records = _llava_data(tmp_path)
    sources = [pre] if template == "plain" else [pre, mix]
    records = {"pretrain": pre_records, "mix": mix_records}
    p = pipeline(sources, epochs=1, rows=5, image_budget=5, template=template)
    batch = next(p)
    t = get_template(template)
    assert len(p.last_batch) == len(pre_records) + (len(mix_records) if template != "plain" else 0)
    for info in p.last_batch:
        conv = t.with_system(read_record(records[info.source][info.record], "llava"), None)
        want = to_training_sample(conv, TOK, 128, TPI, template=t)
        row = batch["tokens"][info.row]
        np.testing.assert_array_equal(row[:len(want)], want.tokens)
        np.testing.assert_array_equal(batch["loss_mask"][info.row][:len(want)], want.loss_mask)
        assert info.num_images == (0 if info.source == "mix" and info.record == 1 else 1)
    if template == "plain":  # the caption and its newline trained, right after the image; no EOS
        first = batch["tokens"][0]
        assert (first[1:1 + TPI] < 0).all() and TOK.eos_id not in first[batch["segment_ids"][0] > 0]
    else:  # every answer ends with a trained EOS
        trained = batch["targets"][batch["loss_mask"]]
        assert (trained == TOK.eos_id).sum() == 3 + 3
    assert p.skip_counts() == {}


class _MuteTokenizer(ToyWordTokenizer):
    """Encodes the word "ineffable" (and the newline after it) to nothing: a caption of it trains no token."""

    def encode(self, text):
        return [] if "ineffable" in text else super().encode(text)


def test_a_sample_with_no_trained_token_is_skipped_and_counted(tmp_path, capsys, monkeypatch):
    from data_pipelines import inspect as inspect_tool
    pre, _, records, _ = _llava_data(tmp_path)
    records[1]["conversations"][1]["value"] = "ineffable"
    path = write_json(tmp_path / "pre.json", records)
    p = pipeline([InstructionSource("pretrain", path, "llava", image_root=str(tmp_path))], epochs=1,
                 template="plain", tokenizer=_MuteTokenizer(512))
    list(p)
    assert p.skip_counts() == {"no_trained_tokens": 1} and p.state()["seen"] == 2
    # python -m data_pipelines.inspect reports it
    monkeypatch.setattr("data_pipelines.tokenizers.load_tokenizer", lambda spec: _MuteTokenizer(512))
    assert inspect_tool.main(["--instructions", path, "--format", "llava", "--image-root", str(tmp_path),
                              "--template", "plain", "--tokenizer", "toy:512", "--tokens-per-image", str(TPI),
                              "--image-size", str(SIZE), "-n", "2", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "template plain" in out and "'no_trained_tokens': 1" in out


def test_an_unknown_template_or_a_system_prompt_with_its_markers_is_refused(data):
    with pytest.raises(DataError, match="unknown conversation template 'vicuna'"):
        pipeline(data["sources"], template="vicuna")
    with pytest.raises(DataError, match="role marker"):
        pipeline(data["sources"], template="vicuna_v1", system_prompt="be nice</s>")
