"""Serving (`owl_jax.serve`, `owl_jax.serving`): the batching, streaming engine; the OpenAI-compatible API
driven by the official `openai` client; bad input; concurrency (16 streamed clients batched, a bounded
number of compiled programs, slow and disconnecting clients); the Gradio web chat in headless Chromium.

One real server (uvicorn in a thread, the API and the web chat on one app) serves the tiny training run
of tests/test_generate.py for the whole module. No timings are asserted.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import socket
import time
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("gradio")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from test_generate import tiny_run  # noqa: E402,F401  (the module-scoped tiny training run)

from owl_jax.chat import DEFAULT_STOP, clean_answer  # noqa: E402
from owl_jax.compile_counter import count_compiles  # noqa: E402
from owl_jax.generate import GenerationSettings, Prompt  # noqa: E402
from owl_jax.serving.engine import Engine, QueueFull, RequestSettings, visible_text  # noqa: E402
from owl_jax.serving.prompts import Conversation, build_prompt, image_pixels  # noqa: E402

QUESTION = "what is in the picture?"


@pytest.fixture(scope="module")
def served(tiny_run):  # noqa: F811
    from owl_jax.loading import load_for_inference
    from owl_jax.serving.app import BackgroundServer, Server, ServerOptions, build_app
    loaded = load_for_inference(tiny_run / "run")
    options = ServerOptions(max_batch=16, max_queue=32, steps_per_call=2, max_body_bytes=1 << 20, warmup=False)
    server = Server("run", RequestSettings(max_new_tokens=24), options).attach(loaded)
    http = BackgroundServer(build_app(server))
    png = (tiny_run / "a.png").read_bytes()
    yield SimpleNamespace(url=http.url, server=server, loaded=loaded, run=tiny_run, png=png)
    http.stop()
    server.close()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _image_message(png: bytes, question: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(png)}},
                                        {"type": "text", "text": question}]}


def _prompt(served, question: str, images: int = 1, max_new_tokens: int = 8) -> Prompt:
    conv = Conversation()
    for _ in range(images):
        conv.add_image(image_pixels(served.png, served.server.image_size))
    return build_prompt(served.loaded, conv, question, max_context=served.server.max_context, trim=False,
                        max_new_tokens=max_new_tokens, default_system=served.server.system_prompt)


def _alone(served, prompt: Prompt, max_new_tokens: int, stop=DEFAULT_STOP) -> str:
    """The answer of `Generator.generate` for the prompt alone (what the engine must stream)."""
    gen = served.server.generator.generate([prompt], GenerationSettings(max_new_tokens=max_new_tokens,
                                                                        stop_strings=stop))[0]
    return clean_answer(gen.text) if stop == DEFAULT_STOP else gen.text.strip()


def _until(condition, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def _client(served, **kw):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, **kw)


# ---------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------


def test_visible_text_holds_back_what_a_stop_string_may_cut():
    stops = ("\nHuman:", "STOP")
    assert visible_text(" a b\nHu", stops, final=False) == ("a b", False)  # could become "\nHuman:"
    assert visible_text(" a b\nHx", stops, final=False) == ("a b\nHx", False)
    assert visible_text("a bST", stops, final=False) == ("a b", False)
    assert visible_text("a b \ufffd", stops, final=False) == ("a b", False)  # an incomplete UTF-8 sequence
    assert visible_text("a b\nHuman: c", stops, final=False) == ("a b", True)
    assert visible_text(" a b\nHu ", stops, final=True) == ("a b\nHu", False)


def test_stream_equals_generate_and_stops_across_chunk_borders(served):
    """Rows batched together stream exactly what each prompt generates alone; a stop string whose
    characters come from two decode calls (2 steps each) ends the row, and no delta ever carried text
    that the stop string cut."""
    server = served.server
    prompts = [_prompt(served, q, max_new_tokens=12) for q in (QUESTION, "what is it?", "a green square")]
    tokenizer = server.loaded.tokenizer
    full = server.generator.generate([prompts[0]], GenerationSettings(max_new_tokens=12, stop_at_eos=True))[0]
    assert len(full.tokens) >= 6, full
    # a stop string made of the end of token 3's text and the start of token 4's (chunks: tokens 0-1, 2-3, 4-5)
    before, upto = tokenizer.decode(full.tokens[:4]), tokenizer.decode(full.tokens[:5])
    stop = upto[len(before) - 1:len(before) + 1]
    assert full.text.index(stop) == len(before) - 1, (full.text, stop)
    engine = server.engine
    sizes = sum(engine.batch_sizes.values())
    streams = [engine.submit(prompts[0], RequestSettings(max_new_tokens=12, stop=(stop,)))]
    streams += [engine.submit(p, RequestSettings(max_new_tokens=12)) for p in prompts[1:]]
    events = [list(s) for s in streams]
    stopped = events[0][-1]
    assert stopped.finish_reason == "stop" and stopped.text == full.text[:full.text.index(stop)].strip()
    assert "".join(events[0][:-1]) == stopped.text and len(events[0]) > 2  # streamed in several pieces
    assert stopped.completion_tokens == 5  # the token that completed the stop string is the last one counted
    for prompt, ev in zip(prompts[1:], events[1:]):
        assert "".join(ev[:-1]) == ev[-1].text == _alone(served, prompt, 12)
    assert sum(engine.batch_sizes.values()) - sizes <= 2  # batched (the first may start alone)


def test_cancelled_request_frees_its_row(served):
    engine = served.server.engine
    prompt = _prompt(served, QUESTION, max_new_tokens=200)
    assert len(_alone(served, prompt, 200, stop=())) > 0
    cancelled = engine.finish_reasons["cancelled"]
    stream = engine.submit(prompt, RequestSettings(max_new_tokens=200, stop=(), stop_at_eos=False))
    first = next(iter(stream))
    assert isinstance(first, str)
    stream.cancel()
    result = stream.collect()
    assert result.finish_reason == "cancelled" and result.completion_tokens < 200
    assert _until(lambda: engine.finish_reasons["cancelled"] == cancelled + 1)
    assert _until(lambda: engine.load() == {"waiting": 0, "running": 0})
    waiting = engine.submit(prompt, RequestSettings(max_new_tokens=4))
    waiting.cancel()  # cancelled before it ran: never generated
    assert waiting.collect().finish_reason == "cancelled"


def test_engine_queue_is_bounded(served):
    engine = Engine(served.server.generator, max_queue=2)  # not started: nothing leaves the queue
    engine.submit(_prompt(served, QUESTION), RequestSettings())
    engine.submit(_prompt(served, QUESTION), RequestSettings())
    with pytest.raises(QueueFull, match="busy"):
        engine.submit(_prompt(served, QUESTION), RequestSettings())
    engine.close()


# ---------------------------------------------------------------------------------------------------
# The OpenAI-compatible API, with the official client
# ---------------------------------------------------------------------------------------------------


def test_openai_client_streamed_equals_nonstreamed_equals_generate(served, capsys):
    from owl_jax.generate import main as generate_main
    client = _client(served)
    assert [m.id for m in client.models.list()] == ["run"]
    messages = [_image_message(served.png, QUESTION)]
    done = client.chat.completions.create(model="run", messages=messages, max_tokens=12, temperature=0)
    text = done.choices[0].message.content
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
    assert done.usage.prompt_tokens == len(_prompt(served, QUESTION).tokens)
    assert 0 < done.usage.completion_tokens <= 12 and done.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model="run", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == text and sum(bool(d) for d in deltas) > 1  # arrived in pieces
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == done.choices[0].finish_reason
    # the same conversation through `python -m owl_jax.generate`
    assert generate_main(["--checkpoint", str(served.run / "run"), "--image", str(served.run / "a.png"),
                          "--prompt", QUESTION, "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip() == text
    # history: a follow-up after the answer is the same prompt as the web chat's conversation
    follow = client.chat.completions.create(model="run", max_tokens=6, temperature=0, messages=[
        *messages, {"role": "assistant", "content": text}, {"role": "user", "content": "what colour?"}])
    conv = Conversation()
    conv.add_image(image_pixels(served.png, served.server.image_size))
    conv.turns += [("human", QUESTION), ("ai", text)]
    prompt = build_prompt(served.loaded, conv, "what colour?", max_context=256, trim=False, max_new_tokens=6,
                          default_system="")
    assert follow.choices[0].message.content == _alone(served, prompt, 6)


def _png(size, mode="RGB") -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


BAD = {  # case: (request body, expected status, a phrase of the message)
    "non_image_upload": (lambda s: {"messages": [_image_message(b"just some text, not a picture", "hi")]}, 400,
                         "not a readable"),
    "truncated_jpeg": (lambda s: {"messages": [_image_message(_jpeg()[:400], "hi")]}, 400, "not a readable"),
    "huge_image": (lambda s: {"messages": [_image_message(_png((10000, 10000), "1"), "hi")]}, 400, "too large"),
    "empty_messages": (lambda s: {"messages": []}, 400, "non-empty"),
    "prompt_too_long": (lambda s: {"messages": [{"role": "user", "content": "word " * 400}]}, 400, "context"),
    "unknown_model": (lambda s: {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404,
                      "does not exist"),
    "malformed_json": (lambda s: b'{"model": "run", "messages": [', 400, "not valid JSON"),
    "unknown_field": (lambda s: {"messages": [{"role": "user", "content": "hi"}], "tempreature": 0}, 400,
                      "tempreature"),
    "remote_image_url": (lambda s: {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/cat.jpg"}}, {"type": "text", "text": "hi"}]}]},
        400, "fetches nothing"),
    "last_message_not_user": (lambda s: {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "user"),
    "bad_temperature": (lambda s: {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400,
                        "temperature"),
    "body_too_large": (lambda s: {"messages": [{"role": "user", "content": "x" * (2 << 20)}]}, 413, "larger"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_answered_never_a_crash(served, case):
    make, status, phrase = BAD[case]
    body = make(served)
    if isinstance(body, dict):
        body = json.dumps({"model": "run", **body}).encode()
    response = httpx.post(served.url + "/v1/chat/completions", content=body, timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert phrase in error["message"] and error["type"] and set(error) == {"message", "type", "param", "code"}
    assert httpx.get(served.url + "/v1/models", timeout=30).status_code == 200  # still serving


def test_errors_reach_the_openai_client_typed(served):
    client = _client(served)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="fetches nothing"):
        client.chat.completions.create(model="run", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, {"type": "text", "text": "?"}]}])
    engine = served.server.engine
    engine.max_queue, saved = 0, engine.max_queue
    try:
        with pytest.raises(openai.RateLimitError, match="busy"):
            client.chat.completions.create(model="run", messages=[{"role": "user", "content": "hi"}])
    finally:
        engine.max_queue = saved


def test_503_while_the_model_loads():
    from fastapi.testclient import TestClient

    from owl_jax.serving.app import Server, build_app
    server = Server("loading-model", RequestSettings())
    with TestClient(build_app(server, web=False)) as client:
        for response in (client.get("/v1/models"), client.post("/v1/chat/completions", json={})):
            assert response.status_code == 503 and "loading" in response.json()["error"]["message"]
            assert response.headers["retry-after"]
        assert client.get("/health").json()["status"] == "loading"
        assert client.get("/v1/nothing").json()["error"]["message"] == "unknown path /v1/nothing"


# ---------------------------------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------------------------------


def test_sixteen_concurrent_streams_are_batched_with_bounded_compiles(served):
    """16 clients stream at once; each gets exactly what its prompt generates alone; the engine batched
    them (fewer generations than requests) and compiled at most one prefill and one decode program per
    batch-size bucket (1, 2, 4, 8, 16: all prompts fall in one length bucket)."""
    engine = served.server.engine
    client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)
    questions = [f"question {i}: what is in the picture?" for i in range(16)]

    async def one(q):
        stream = await client.chat.completions.create(model="run", messages=[_image_message(served.png, q)],
                                                      max_tokens=8, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(q) for q in questions))
        finally:
            await client.close()

    before, shapes = engine.batch_sizes.copy(), set(engine.shapes)
    with count_compiles() as compiles:
        answers = asyncio.run(all_of_them())
    sizes = engine.batch_sizes - before  # requests per generation, for these 16
    assert answers == [_alone(served, _prompt(served, q), 8) for q in questions]
    assert sizes.total() < 16 and max(sizes) >= 4, sizes
    new_shapes = engine.shapes - shapes
    assert {b for b, _, _ in new_shapes} <= {1, 2, 4, 8, 16} and len({(p, n) for _, p, n in engine.shapes}) <= 3
    assert compiles["jit(_decode)"] <= len(new_shapes) and compiles["jit(_prefill)"] <= len(new_shapes), \
        dict(compiles.counts)


def test_a_slow_client_blocks_nobody(served):
    """A client that sends half its body and stalls, and one that never reads its stream, while another
    client's request completes."""
    body = json.dumps({"model": "run", "max_tokens": 4, "messages": [{"role": "user", "content": QUESTION}]}).encode()
    host, port = served.url.removeprefix("http://").split(":")
    slow = socket.create_connection((host, int(port)), timeout=60)
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
    with httpx.Client(timeout=60) as unread:
        request = {"model": "run", "max_tokens": 100, "stream": True,
                   "messages": [{"role": "user", "content": QUESTION}]}
        with unread.stream("POST", served.url + "/v1/chat/completions", json=request):
            done = _client(served).chat.completions.create(model="run", max_tokens=4,
                                                           messages=[{"role": "user", "content": "what is it?"}])
            assert done.choices[0].message.content == _alone(served, _prompt(served, "what is it?", 0), 4)
    slow.sendall(body[10:])
    reply = b""
    while b"chat.completion" not in reply:
        reply += slow.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200")
    slow.close()


def test_a_disconnecting_client_frees_its_slot(served):
    engine = served.server.engine
    prompt = _prompt(served, "what is it?", max_new_tokens=200)
    settings = GenerationSettings(max_new_tokens=200, stop_strings=DEFAULT_STOP)
    assert served.server.generator.generate([prompt], settings)[0].finish_reason == "length"  # a long answer
    cancelled = engine.finish_reasons["cancelled"]
    request = {"model": "run", "max_tokens": 200, "temperature": 0, "stream": True,
               "messages": [_image_message(served.png, "what is it?")]}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", served.url + "/v1/chat/completions", json=request) as response:
            for line in response.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # the first text arrived: go away mid-answer
    deadline = time.monotonic() + 30
    while engine.finish_reasons["cancelled"] == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _until(lambda: engine.finish_reasons["cancelled"] == cancelled + 1)
    assert _until(lambda: engine.load() == {"waiting": 0, "running": 0})


# ---------------------------------------------------------------------------------------------------
# The web chat in a real browser
# ---------------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

_RECORD_ANSWERS = """() => {
  window.__answers = [];
  new MutationObserver(() => {
    const bots = document.querySelectorAll('#chatbot [data-testid=bot]');
    window.__answers.push([bots.length, bots.length ? bots[bots.length - 1].innerText : '']);
  }).observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
}"""


def _wait_answer(page, count: int) -> list[str]:
    """Wait until answer `count` is complete (the text box is usable again); the texts it showed meanwhile."""
    page.wait_for_function(f"() => document.querySelectorAll('#chatbot [data-testid=bot]').length >= {count}",
                           timeout=120_000)
    page.wait_for_function("() => !document.querySelector('#question textarea').disabled", timeout=120_000)
    page.wait_for_timeout(300)
    return [text for n, text in page.evaluate("() => window.__answers") if n == count]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium browser installed (apt-get install chromium)")
def test_web_chat_in_a_real_browser(served, tmp_path):
    """Headless Chromium: the page opens, a picture is uploaded, a question asked; the answer grows while
    it streams and ends as the engine's answer; a follow-up; Regenerate replaces the last answer; Clear
    empties the chat. Screenshot: tmp_path/chat.png."""
    sync_api = pytest.importorskip("playwright.sync_api")
    picture = served.run / "a.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                       headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(served.url + "/")
            page.wait_for_selector("#question textarea", timeout=120_000)
            assert "/ 256 tokens" in page.inner_text("#status")
            page.evaluate(_RECORD_ANSWERS)
            page.set_input_files("#question input[type=file]", str(picture))
            page.wait_for_selector("#question img", timeout=60_000)  # the upload's thumbnail
            page.fill("#question textarea", QUESTION)
            page.press("#question textarea", "Enter")
            seen = _wait_answer(page, 1)
            final = page.locator("#chatbot [data-testid=bot]").last.inner_text()
            growing = [t for i, t in enumerate(seen) if t and (i == 0 or t != seen[i - 1])]
            assert len(set(growing)) >= 3 and all(final.startswith(t.strip()) for t in growing), growing
            assert final.strip() == _alone(served, _prompt(served, QUESTION, max_new_tokens=24), 24).strip()
            assert page.locator("#chatbot [data-testid=user] img").count() == 1
            tokens = int(page.inner_text("#status").split("Context:")[1].split("/")[0])
            assert tokens > len(_prompt(served, QUESTION).tokens)
            page.fill("#question textarea", "what colour is it?")
            page.press("#question textarea", "Enter")
            _wait_answer(page, 2)
            assert page.locator("#chatbot [data-testid=bot]").count() == 2
            assert int(page.inner_text("#status").split("Context:")[1].split("/")[0]) > tokens
            follow_up = page.locator("#chatbot [data-testid=bot]").last.inner_text()
            page.evaluate("() => { window.__answers = []; }")
            page.click("#regenerate")  # greedy: the same answer again, in place of the last one
            page.wait_for_function("() => window.__answers.some(a => a[0] == 1)", timeout=60_000)
            _wait_answer(page, 2)
            assert page.locator("#chatbot [data-testid=bot]").count() == 2
            assert page.locator("#chatbot [data-testid=bot]").last.inner_text() == follow_up
            page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
            page.click("#clear")
            page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=bot]').length == 0",
                                   timeout=30_000)
            assert page.locator("#chatbot [data-testid=user]").count() == 0
            assert "Context: 0 /" in page.inner_text("#status")
        finally:
            browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,expect", [(["--checkpoint", "/nonexistent/run"], "does not exist"),
                                         (["--checkpoint", ".", "--max-batch", "0"], "--max-batch")])
def test_serve_cli_user_errors_exit_2(args, expect, capsys):
    from owl_jax.serve import main
    try:
        code = main(args)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and expect in err and "Traceback" not in err
    assert os.environ.get("GRADIO_ANALYTICS_ENABLED", "False") == "False"
