"""Code in the user docs runs and says what it claims: docs/pytorch.md's PyTorch prompt builder gives
owl-jax's prompt ids (the official chunked tokenisation) through a transformers tokenizer."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tested_block(doc: str) -> str:
    text = open(os.path.join(ROOT, doc)).read()
    match = re.search(r"<!-- tested: [^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, f"no tested python block in {doc}"
    return match.group(1)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """(owl-jax tokenizer, transformers tokenizer) of one small SentencePiece model, the transformers one
    loaded from the files an export writes."""
    transformers = pytest.importorskip("transformers")
    from data_pipelines.synthetic import train_tokenizer
    from data_pipelines.tokenizers import load_tokenizer
    from owl_jax.config import load_config
    from owl_jax.export import copy_tokenizer, find_tokenizer_files
    root = tmp_path_factory.mktemp("doc_tok")
    lines = ["what colour is the circle?", "Human: describe the picture\nAI: a red square at the top",
             "The following is a conversation between a curious human and AI assistant."]
    (root / "spm.model").write_bytes(train_tokenizer(lines * 40, 300))
    out = root / "export"
    out.mkdir()
    cfg = load_config(os.path.join(ROOT, "configs/tiny_test.yaml"))
    copy_tokenizer(find_tokenizer_files(str(root / "spm.model")), out, cfg.model)
    return load_tokenizer(str(root / "spm.model")), transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)


@pytest.mark.parametrize("num_images, system", [(1, None), (2, None), (0, None), (1, ""), (0, "")])
def test_pytorch_prompt_snippet_gives_owl_jax_ids(hf_tokenizer, num_images, system):
    from data_pipelines.conversation import HUMAN, IMAGE_TAG, SYSTEM_PROMPT
    from data_pipelines.tokenize import to_prompt
    ours, theirs = hf_tokenizer
    namespace: dict = {}
    exec(_tested_block("docs/pytorch.md"), namespace)  # noqa: S102 - the project's own documentation
    system = SYSTEM_PROMPT if system is None else system
    assert namespace["SYSTEM"] == SYSTEM_PROMPT
    question = "What colour is the circle?"
    turns = [(HUMAN, IMAGE_TAG)] * num_images + [(HUMAN, question)]
    expected = to_prompt(turns, ours, 65, images=["x"] * num_images, system=system).tolist()
    got = namespace["owl_prompt_ids"](theirs, question, num_images=num_images, system=system)
    assert got == expected
