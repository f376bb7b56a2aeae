"""Conversation templates (`data_pipelines/templates.py`): LLaVA's `plain`, `vicuna_v1` and `llava_llama_2`
against LLaVA's own algorithm, one abstraction for training samples, prompts and stop strings.

The reference is a line-by-line port of LLaVA's code (haotian-liu/LLaVA, `llava/conversation.py`
`Conversation.get_prompt`, `llava/train/train.py` `preprocess_multimodal` / `preprocess_plain` /
`preprocess_v1` / `preprocess_llama_2`, `llava/mm_utils.py` `tokenizer_image_token`) run with a real
SentencePiece model through `LegacyLlamaTokenizer`, what LLaVA's slow `LlamaTokenizer` (legacy=True) does
with a text: BOS first, `<s>` / `</s>` in the text become BOS / EOS, the text between them encoded by
SentencePiece (dummy prefix included). Our ids and loss masks must equal its `input_ids` and `labels`.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from data_pipelines.conversation import AI, HUMAN, BadRecord, make_conversation, read_record
from data_pipelines.templates import (LLAVA_LLAMA_2_SYSTEM, TEMPLATES, VICUNA_V1_SYSTEM, get_template)
from data_pipelines.tokenize import IMAGE_ID, to_prompt, to_training_sample
from data_pipelines.tokenizers import SentencePieceTokenizer, ToyWordTokenizer

IGNORE_INDEX, IMAGE_TOKEN_INDEX = -100, -200
TPI = 4


# --------------------------------------------------------------------------------------------------
# LLaVA's code, ported (names and structure kept)
# --------------------------------------------------------------------------------------------------

class _Ids:
    def __init__(self, ids):
        self.input_ids = ids


class LegacyLlamaTokenizer:
    """The slow `LlamaTokenizer(legacy=True)` LLaVA trains with, over a SentencePiece model."""

    legacy = True
    model_max_length = 1 << 20

    def __init__(self, sp: SentencePieceTokenizer):
        self.sp = sp
        self.bos_token_id, self.eos_token_id, self.pad_token_id = sp.bos_id, sp.eos_id, 0

    def __call__(self, text: str) -> _Ids:
        ids = [self.bos_token_id]
        rest = text
        while rest:
            cuts = [(rest.find(t), t) for t in ("<s>", "</s>") if t in rest]
            if not cuts:
                ids += self.sp.encode(rest)
                break
            at, tok = min(cuts)
            ids += self.sp.encode(rest[:at]) + [self.bos_token_id if tok == "<s>" else self.eos_token_id]
            rest = rest[at + len(tok):]
        return _Ids(ids)


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split('<image>')]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


@dataclasses.dataclass
class LlavaConversation:
    system: str
    roles: tuple
    messages: list
    sep_style: str
    sep: str
    sep2: str = None

    def get_prompt(self):
        messages = self.messages
        if self.sep_style == "TWO":
            seps = [self.sep, self.sep2]
            ret = self.system + seps[0]
            for i, (role, message) in enumerate(messages):
                if message:
                    ret += role + ": " + message + seps[i % 2]
                else:
                    ret += role + ":"
        elif self.sep_style == "LLAMA_2":
            wrap_sys = lambda msg: f"<<SYS>>\n{msg}\n<</SYS>>\n\n" if len(msg) > 0 else msg  # noqa: E731
            wrap_inst = lambda msg: f"[INST] {msg} [/INST]"  # noqa: E731
            ret = ""
            for i, (role, message) in enumerate(messages):
                if message:
                    if i == 0:
                        message = wrap_sys(self.system) + message
                    if i % 2 == 0:
                        message = wrap_inst(message)
                        ret += self.sep + message
                    else:
                        ret += " " + message + " " + self.sep2
                else:
                    ret += ""
            ret = ret.lstrip(self.sep)
        elif self.sep_style == "PLAIN":
            seps = [self.sep, self.sep2]
            ret = self.system
            for i, (role, message) in enumerate(messages):
                if message:
                    ret += message + seps[i % 2]
        return ret


CONVS = {
    "vicuna_v1": lambda: LlavaConversation(VICUNA_V1_SYSTEM, ("USER", "ASSISTANT"), [], "TWO", " ", "</s>"),
    "llava_llama_2": lambda: LlavaConversation(LLAVA_LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), [], "LLAMA_2", "<s>",
                                               "</s>"),
    "plain": lambda: LlavaConversation("", ("", ""), [], "PLAIN", "\n"),
}


def preprocess_multimodal(source):
    for sentence in source:
        if '<image>' in sentence['value']:
            sentence['value'] = sentence['value'].replace('<image>', '').strip()
            sentence['value'] = '<image>' + '\n' + sentence['value']
            sentence['value'] = sentence['value'].strip()
    return source


def preprocess_plain(source, tokenizer):
    assert len(source) == 2
    assert '<image>' in source[0]['value']
    source[0]['value'] = '<image>'
    conversation = source[0]['value'] + source[1]['value'] + "\n"
    input_ids = np.asarray(tokenizer_image_token(conversation, tokenizer))
    target = input_ids.copy()
    tokenized_len = len(tokenizer_image_token(source[0]['value'], tokenizer))
    target[:tokenized_len] = IGNORE_INDEX
    return input_ids, target


def _apply(conv, source):
    roles = {"human": conv.roles[0], "gpt": conv.roles[1]}
    if roles[source[0]["from"]] != conv.roles[0]:
        source = source[1:]
    conv.messages = []
    for j, sentence in enumerate(source):
        role = roles[sentence["from"]]
        assert role == conv.roles[j % 2]
        conv.messages.append([role, sentence["value"]])
    return conv.get_prompt()


def preprocess_v1_or_llama_2(name, source, tokenizer, has_image):
    """`preprocess_v1` (vicuna_v1) and `preprocess_llama_2`: identical but for the separators."""
    conv = CONVS[name]()
    conversation = _apply(conv, source)
    if has_image:
        input_ids = np.asarray(tokenizer_image_token(conversation, tokenizer))
    else:
        input_ids = np.asarray(tokenizer(conversation).input_ids)
    target = input_ids.copy()
    sep = conv.sep + conv.roles[1] + ": " if name == "vicuna_v1" else "[/INST] "
    total_len = int((target != tokenizer.pad_token_id).sum())
    rounds = conversation.split(conv.sep2)
    cur_len = 1
    target[:cur_len] = IGNORE_INDEX
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        if has_image:
            round_len = len(tokenizer_image_token(rou, tokenizer))
            instruction_len = len(tokenizer_image_token(parts[0], tokenizer)) - 2
        else:
            round_len = len(tokenizer(rou).input_ids)
            instruction_len = len(tokenizer(parts[0]).input_ids) - 2
        target[cur_len: cur_len + instruction_len] = IGNORE_INDEX
        cur_len += round_len
    target[cur_len:] = IGNORE_INDEX
    if cur_len != total_len:  # LLaVA: "WARNING: tokenization mismatch" and the whole sample ignored
        target[:] = IGNORE_INDEX
    return input_ids, target


def llava_sample(name, record, tokenizer):
    """(input_ids, labels) as LLaVA's LazySupervisedDataset makes them."""
    source = copy.deepcopy(record["conversations"])
    has_image = "image" in record
    if has_image:
        source = preprocess_multimodal(source)
    if name == "plain":
        return preprocess_plain(source, tokenizer)
    return preprocess_v1_or_llama_2(name, source, tokenizer, has_image)


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------

def _msgs(*pairs, image=None):
    record = {"id": "x", "conversations": [{"from": f, "value": v} for f, v in pairs]}
    if image:
        record["image"] = image
    return record


RECORDS = {
    "image_first": _msgs(("human", "<image>\nWhat is in the picture?"), ("gpt", "A red circle on the left."),
                         image="a.jpg"),
    "pretrain_image_last": _msgs(("human", "Give a brief description of the image.\n<image>"),
                                 ("gpt", "a small green square"), image="00453/004539375.jpg"),
    "multi_turn": _msgs(("human", "What colour is the circle?\n<image>"), ("gpt", "It is red."),
                        ("human", "And where is it?"), ("gpt", "On the left,\nnear the edge."), image="b.jpg"),
    "text_only": _msgs(("human", "Write a haiku about rain."), ("gpt", "Soft rain on the roof"),
                       ("human", "Another one?"), ("gpt", "Grey clouds, then the sun.")),
    "leading_gpt": _msgs(("gpt", "Hello!"), ("human", "<image>\nDescribe it."), ("gpt", "A blue triangle."),
                         image="c.jpg"),
}
LINES = [VICUNA_V1_SYSTEM, LLAVA_LLAMA_2_SYSTEM, "USER: ASSISTANT: [INST] <<SYS>> <</SYS>> [/INST]",
         "###Human: <Img> </Img> Describe this image in detail. ###Assistant: The image shows a red circle###"] + [
    m["value"] for r in RECORDS.values() for m in r["conversations"]]


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    from data_pipelines.synthetic import train_tokenizer
    path = tmp_path_factory.mktemp("tpl") / "tokenizer.model"
    path.write_bytes(train_tokenizer(LINES * 20, 420))
    return SentencePieceTokenizer(path)


def _ours(name, record, sp, seq_len=4096):
    template = get_template(name)
    conv = template.with_system(read_record(record, "llava", markers=template.markers), None)
    return to_training_sample(conv, sp, seq_len, TPI, template=template)


def _expanded(ids, labels):
    """LLaVA's ids (one IMAGE_TOKEN_INDEX per image) and labels with each image as TPI slots of -1, and the
    positions whose token is trained."""
    out_ids, trained = [], []
    for i, l in zip(ids, labels):
        n = TPI if i == IMAGE_TOKEN_INDEX else 1
        out_ids += [IMAGE_ID if i == IMAGE_TOKEN_INDEX else int(i)] * n
        trained += [bool(l != IGNORE_INDEX)] * n
    return np.asarray(out_ids), np.asarray(trained)


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vicuna_v1", "llava_llama_2"])
@pytest.mark.parametrize("case", list(RECORDS))
def test_ids_and_masks_equal_llavas(name, case, sp):
    record = RECORDS[case]
    ids, labels = llava_sample(name, record, LegacyLlamaTokenizer(sp))
    want_ids, want_trained = _expanded(ids, labels)
    assert want_trained.any(), "LLaVA itself reported a tokenization mismatch (the reference is broken)"
    s = _ours(name, record, sp)
    np.testing.assert_array_equal(s.tokens, want_ids)
    np.testing.assert_array_equal(s.loss_mask[:-1], want_trained[1:])  # loss at t trains token t + 1
    assert not s.loss_mask[-1] and s.tokens[-1] == sp.eos_id  # '</s>' is trained
    # the rendered text is LLaVA's get_prompt()
    template = get_template(name)
    conv = template.with_system(read_record(record, "llava", markers=template.markers), None)
    source = copy.deepcopy(record["conversations"])
    source = preprocess_multimodal(source) if "image" in record else source
    assert template.render(conv) == _apply(CONVS[name](), source)


@pytest.mark.parametrize("case", ["image_first", "pretrain_image_last"])
def test_plain_equals_preprocess_plain(case, sp):
    ids, labels = llava_sample("plain", RECORDS[case], LegacyLlamaTokenizer(sp))
    want_ids, want_trained = _expanded(ids, labels)
    s = _ours("plain", RECORDS[case], sp)
    np.testing.assert_array_equal(s.tokens, want_ids)
    np.testing.assert_array_equal(s.loss_mask[:-1], want_trained[1:])
    # image, then the caption and its newline trained; no EOS; the question is not in the sample
    assert s.tokens[0] == sp.bos_id and (s.tokens[1:1 + TPI] == IMAGE_ID).all() and sp.eos_id not in s.tokens
    assert s.loss_mask[TPI:-1].all() and not s.loss_mask[:TPI].any()
    with pytest.raises(BadRecord, match="plain template takes one image"):
        _ours("plain", RECORDS["multi_turn"], sp)


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_llama_2", "plain", "mplug_owl"])
def test_prompts_are_llavas_and_open_the_trained_answer(name, sp):
    """The generation prompt is what LLaVA's inference builds (`get_prompt()` with an empty assistant
    message, through tokenizer_image_token) and the first ids of the training sample."""
    template = get_template(name)
    turns = [(HUMAN, "<image>"), (HUMAN, "What is in the picture?")]
    system = template.default_system
    prompt = to_prompt(turns, sp, TPI, images=["a"], system=system, template=name)
    sample = to_training_sample(make_conversation([*turns, (AI, "A red circle.")], ["a"], system,
                                                  markers=template.markers), sp, 4096, TPI, template=name)
    first_trained = int(np.flatnonzero(sample.loss_mask)[0]) + 1
    np.testing.assert_array_equal(prompt, sample.tokens[:first_trained])
    if name in CONVS:
        conv = CONVS[name]()
        message = "<image>\nWhat is in the picture?" if name != "plain" else "<image>"
        conv.messages = [["USER", message], ["ASSISTANT", None]]
        text = conv.get_prompt() if name != "plain" else "<image>"
        want, _ = _expanded(tokenizer_image_token(text, LegacyLlamaTokenizer(sp)), [0] * 1000)
        np.testing.assert_array_equal(prompt, want)


def test_registry_config_choices_and_stop_strings():
    from owl_jax.config import DataConfig, field_choices
    assert field_choices(DataConfig, "template") == tuple(TEMPLATES)
    assert DataConfig().template == "mplug_owl"
    assert get_template(None) is TEMPLATES["mplug_owl"]
    with pytest.raises(ValueError, match="unknown conversation template 'chatml'; choose one of mplug_owl"):
        get_template("chatml")
    assert TEMPLATES["mplug_owl"].stop_strings == ("\nHuman:", "\nAI:")
    assert TEMPLATES["vicuna_v1"].clean_answer(" It is red. USER: and") == "It is red."
    assert TEMPLATES["plain"].clean_answer("a red circle\nsomething else") == "a red circle"


def test_template_markers_are_refused_only_in_their_template(sp):
    """Text that reads as template structure is a counted bad record in that template alone."""
    record = _msgs(("human", "<image>\nq"), ("gpt", "the end</s> of it"), image="a.jpg")
    with pytest.raises(BadRecord, match="role marker"):
        _ours("vicuna_v1", record, sp)
    assert len(_ours("mplug_owl", record, sp))
    mplug = _msgs(("human", "<image>\nq"), ("gpt", "a\nHuman: b"), image="a.jpg")
    with pytest.raises(BadRecord, match="role marker"):
        _ours("mplug_owl", mplug, sp)
    assert len(_ours("vicuna_v1", mplug, sp))


def test_system_prompt_follows_the_template():
    conv = read_record(RECORDS["text_only"], "llava")
    assert get_template("vicuna_v1").with_system(conv, None).system == VICUNA_V1_SYSTEM
    assert get_template("vicuna_v1").with_system(conv, "").system == ""
    assert get_template("mplug_owl").with_system(conv, None) == conv
    own = dataclasses.replace(conv, system="Be brief.")
    assert get_template("vicuna_v1").with_system(own, None).system == "Be brief."


class _Silent(ToyWordTokenizer):
    """A tokenizer that encodes every text to nothing (what an answer of unknown characters can become)."""

    def encode(self, text):
        return []


def test_a_sample_with_nothing_trained_is_refused():
    conv = make_conversation([(HUMAN, "<image>"), (HUMAN, "q"), (AI, "a caption")], ["a"])
    with pytest.raises(BadRecord, match="no trained tokens"):
        to_training_sample(conv, _Silent(), 64, TPI, template="plain")


def test_truncation_in_llava_templates(sp):
    full = _ours("vicuna_v1", RECORDS["multi_turn"], sp)
    ends = np.flatnonzero(full.tokens == sp.eos_id)
    # cut inside the second answer: it keeps its first tokens and ends with a trained EOS
    s = _ours("vicuna_v1", RECORDS["multi_turn"], sp, seq_len=int(ends[1]) - 1)
    assert s.truncated and s.tokens[-1] == sp.eos_id and s.loss_mask[-2]
    np.testing.assert_array_equal(s.tokens[:-1], full.tokens[:len(s) - 1])
    # plain: a cut caption just ends (no EOS in that template)
    p_full = _ours("plain", RECORDS["image_first"], sp)
    p = _ours("plain", RECORDS["image_first"], sp, seq_len=len(p_full) - 2)
    np.testing.assert_array_equal(p.tokens, p_full.tokens[:len(p)])
    assert p.loss_mask[:-1].sum() == len(p) - 1 - TPI  # every token after BOS and the image


def test_chat_sessions_prompt_in_the_runs_template(sp):
    """`ChatSession.for_config` follows `data.template`: its prompts are `to_prompt` in that template with the
    template's default system prompt, a multi-turn history renders as LLaVA renders it, answers are cleaned
    at the template's stop strings, and the session's stop strings are the template's."""
    from owl_jax.chat import ChatSession, stop_strings, system_prompt
    from owl_jax.config import Config
    cfg = Config()
    cfg.data.template = "vicuna_v1"
    cfg.model.text.max_position_embeddings = 4096
    chat = ChatSession.for_config(cfg, sp)
    assert chat.system == VICUNA_V1_SYSTEM == system_prompt(cfg) and chat.stop_strings == ("USER:",) == stop_strings(cfg)
    chat.tokens_per_image = TPI
    chat.add_image(np.zeros((2, 2, 3)))
    first = chat.prompt("What is in the picture?")
    np.testing.assert_array_equal(first.tokens, to_prompt([(HUMAN, "<image>"), (HUMAN, "What is in the picture?")],
                                                          sp, TPI, images=["a"], system=VICUNA_V1_SYSTEM,
                                                          template="vicuna_v1"))
    assert chat.record("What is in the picture?", " A red circle. USER: what else") == "A red circle."
    second = chat.prompt("Where is it?")
    conv = CONVS["vicuna_v1"]()
    conv.messages = [["USER", "<image>\nWhat is in the picture?"], ["ASSISTANT", "A red circle."],
                     ["USER", "Where is it?"], ["ASSISTANT", None]]
    want, _ = _expanded(tokenizer_image_token(conv.get_prompt(), LegacyLlamaTokenizer(sp)), [0] * 4096)
    np.testing.assert_array_equal(second.tokens, want)
    cfg.data.template = "mplug_owl"  # the default is untouched
    assert ChatSession.for_config(cfg, sp).stop_strings == ("\nHuman:", "\nAI:")


# --------------------------------------------------------------------------------------------------
# MiniGPT-4 (Vision-CAIR/MiniGPT-4, first release) and InstructBLIP (LAVIS), ported
# --------------------------------------------------------------------------------------------------

MINIGPT4_PROMPT_TEMPLATE, MINIGPT4_END_SYM = "###Human: {} ###Assistant: ", "###"  # minigpt4_stage2_finetune.yaml


def minigpt4_stage2(prompt, caption, tokenizer):
    """`MiniGPT4.prompt_wrap` + `forward` of one sample (image slots as IMAGE_TOKEN_INDEX, targets -100):
    BOS, `p_before`, the image, `p_after`, then `caption + end_sym` — each tokenised on its own without
    special tokens; the loss on the caption part only (its pad = EOS is masked; one sample has no pad)."""
    p_before, p_after = prompt.split("<ImageHere>")
    before = tokenizer(p_before).input_ids[1:]  # add_special_tokens=False
    after = tokenizer(p_after).input_ids[1:]
    regress = tokenizer(caption + MINIGPT4_END_SYM).input_ids[1:]
    ids = [tokenizer.bos_token_id] + before + [IMAGE_TOKEN_INDEX] + after + regress
    return ids, [IGNORE_INDEX] * (len(ids) - len(regress)) + regress


def instructblip_forward(instruction, answer, tokenizer):
    """LAVIS `Blip2VicunaInstruct.forward` of one sample: the query tokens, `llm_tokenizer(text_input)`
    (BOS first), `llm_tokenizer(text_output + eos)[1:]` (`concat_text_input_output`); loss on the output."""
    inp = tokenizer(instruction).input_ids
    out = tokenizer(answer + "</s>").input_ids[1:]
    ids = [IMAGE_TOKEN_INDEX] + inp + out
    return ids, [IGNORE_INDEX] * (1 + len(inp)) + out


_CAPTION = "The image shows a red circle near the left edge, on a white background."


@pytest.mark.parametrize("variant", range(4))
def test_minigpt4_equals_minigpt4s_stage2_samples(variant, sp):
    """cc_sbu_align records in the `minigpt4` template are MiniGPT-4's stage-2 samples: its alignment
    prompt (`prompts/alignment.txt` through `prompt_template`), split at `<ImageHere>`, `caption###`."""
    from data_pipelines.conversation import ALIGN_PROMPTS
    template = get_template("minigpt4")
    record = {"image_id": "2", "caption": _CAPTION}
    conv = template.with_system(read_record(record, "cc_sbu_align", markers=template.markers, variant=variant), None)
    assert conv.images == ("image/2.jpg",)
    prompt = MINIGPT4_PROMPT_TEMPLATE.format("<Img><ImageHere></Img> " + ALIGN_PROMPTS[variant])
    want_ids, want_trained = _expanded(*minigpt4_stage2(prompt, _CAPTION, LegacyLlamaTokenizer(sp)))
    s = to_training_sample(conv, sp, 4096, TPI, template=template)
    np.testing.assert_array_equal(s.tokens, want_ids)
    np.testing.assert_array_equal(s.loss_mask[:-1], want_trained[1:])
    assert sp.eos_id not in s.tokens  # MiniGPT-4 trains `###`, never EOS
    assert template.render(conv) == prompt.replace("<ImageHere>", "<image>") + _CAPTION + "###"
    # the prompt is the trained context up to the answer
    turns = [(HUMAN, "<image>"), (HUMAN, ALIGN_PROMPTS[variant])]
    np.testing.assert_array_equal(to_prompt(turns, sp, TPI, images=["a"], system="", template="minigpt4"),
                                  want_ids[:int(np.flatnonzero(want_trained)[0])])
    assert template.clean_answer(" A red circle.###Human: more") == "A red circle."
    with pytest.raises(BadRecord, match="role marker"):
        read_record({"image_id": 3, "caption": "a ### b"}, "cc_sbu_align", markers=template.markers)


def test_instructblip_equals_lavis(sp):
    """`instructblip`: the query tokens before BOS, the raw instruction, the answer + EOS trained (LAVIS)."""
    template = get_template("instructblip")
    record = RECORDS["image_first"]
    conv = template.with_system(read_record(record, "llava", markers=template.markers), None)
    want_ids, want_trained = _expanded(*instructblip_forward("What is in the picture?", "A red circle on the left.",
                                                             LegacyLlamaTokenizer(sp)))
    s = to_training_sample(conv, sp, 4096, TPI, template=template)
    np.testing.assert_array_equal(s.tokens, want_ids)
    np.testing.assert_array_equal(s.loss_mask[:-1], want_trained[1:])
    assert (s.tokens[:TPI] == IMAGE_ID).all() and s.tokens[TPI] == sp.bos_id and s.tokens[-1] == sp.eos_id
    assert template.image_instructions(conv) == ["What is in the picture?"]
    prompt = to_prompt([(HUMAN, "<image>"), (HUMAN, "What is in the picture?")], sp, TPI, images=["a"],
                       system="", template="instructblip")
    np.testing.assert_array_equal(prompt, want_ids[:int(np.flatnonzero(want_trained)[0])])
    with pytest.raises(BadRecord, match="instructblip template takes one image"):
        _ours("instructblip", _msgs(("human", "<image>\nq"), ("gpt", "a"), ("human", "<image>\nq2"), ("gpt", "b"),
                                    image=["a.jpg", "b.jpg"]), sp)
