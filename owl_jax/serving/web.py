"""The web chat (Gradio): pictures and questions in, answers streamed in as the engine decodes them.

Upload one or more pictures with the text box's button (or drop them on it), ask, follow up: the
conversation is the model's own template (`owl_jax.chat.ChatSession`, oldest turns dropped when the
context is full, pictures kept). Regenerate asks the last question again (a new sample when sampling),
Stop ends the answer where it is (kept in the conversation), Clear starts over. The generation panel
holds the sampling controls and the presets (greedy, the official demo's). The line under the chat
counts the conversation's tokens against the model's context.

Each browser session keeps its conversation in a `gr.State` (turns and preprocessed pictures); answers
come from the shared engine, so several people chatting at once are batched together.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline server

from owl_jax.sampling import OFFICIAL_DEMO, SamplingParams  # noqa: E402
from owl_jax.serving.engine import EngineError  # noqa: E402
from owl_jax.serving.prompts import AI, HUMAN, IMAGE_TAG, BadInput, Conversation, build_prompt, image_pixels  # noqa: E402

PRESETS = {"greedy": SamplingParams(), "official demo": OFFICIAL_DEMO}
#: System fonts only: the page loads nothing from outside the server.
_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
_MONO = ["ui-monospace", "monospace"]


def example_pictures(directory: str, count: int = 3) -> list[dict]:
    """Pictures of the demo world (`data_pipelines.synthetic`, an `example` split the demo never trains on)
    written as PNGs under `directory`, each with a question of the demo's kinds: what the demo's model
    was taught to answer, and plain pictures for any other model."""
    from PIL import Image

    from data_pipelines import synthetic
    out = []
    for i, kind in zip(range(count), ("colour", "shape", "position", "describe")):
        picture = synthetic.sample_picture(0, "example", i, 224, two_shape_fraction=0.0)
        path = os.path.join(directory, f"example-{i}.png")
        Image.fromarray(synthetic.render_picture(picture, 0, 224)).save(path)
        question, _ = synthetic.question(kind, picture, random.Random(i))
        out.append({"text": question, "files": [path]})
    return out


def _status(server, tokens: int | None = None, trimmed: bool = False) -> str:
    if server.status != "ready":
        return {"loading": f"Loading **{server.name}** …", "failed": f"Cannot serve the model: {server.error}",
                "closed": "The server is shutting down."}[server.status]
    count = 0 if tokens is None else tokens
    note = " (the oldest turns were dropped to fit)" if trimmed else ""
    return f"Context: **{count}** / {server.max_context} tokens{note}"


def _new_state() -> dict:
    return {"turns": [], "images": [], "pending": None, "tokens": 0, "tries": 0}


def _sampling(sample: bool, temperature, top_k, top_p, penalty, ngram) -> SamplingParams:
    return SamplingParams(do_sample=bool(sample), temperature=float(temperature), top_k=int(top_k),
                          top_p=float(top_p), repetition_penalty=float(penalty), no_repeat_ngram_size=int(ngram))


def build_blocks(server):
    """The chat page for `server` (`owl_jax.serving.app.Server`); the model may still be loading."""
    import asyncio

    import gradio as gr

    defaults = server.defaults
    s = defaults.sampling
    examples_dir = tempfile.mkdtemp(prefix="owl-serve-examples-")

    def add_message(history, message, state):
        history = list(history or [])
        state = dict(state)
        state["pending"] = None
        message = message or {}
        for path in message.get("files") or []:
            name = os.path.basename(path)
            if server.status != "ready":
                gr.Warning("the model is still loading")
                break
            if not server.has_vision:
                gr.Warning(f"{server.name} is text-only: pictures are not supported")
                break
            try:
                with open(path, "rb") as f:
                    pixels = image_pixels(f.read(), server.image_size, max_pixels=server.max_image_pixels,
                                          what=name)
            except (BadInput, OSError) as e:
                gr.Warning(str(e))
                continue
            if len(state["images"]) >= server.max_images:
                gr.Warning(f"at most {server.max_images} pictures per conversation")
                break
            state["turns"] = [*state["turns"], (HUMAN, IMAGE_TAG)]
            state["images"] = [*state["images"], pixels]
            history.append({"role": "user", "content": {"path": path}})
        text = (message.get("text") or "").strip()
        if text:
            history.append({"role": "user", "content": text})
            state["pending"] = text
        return history, gr.MultimodalTextbox(value=None, interactive=False), state

    async def respond(history, state, max_new, sample, temperature, top_k, top_p, penalty, ngram, seed):
        history, state = list(history or []), dict(state)
        question = state.get("pending")
        if not question:
            yield history, state, _status(server, state["tokens"])
            return
        state["pending"] = None
        if server.status != "ready":
            gr.Warning(_status(server))
            yield history, state, _status(server)
            return
        try:
            conversation = Conversation(list(state["turns"]), list(state["images"]))
            prompt = build_prompt(server.loaded, conversation, question, max_context=server.max_context, trim=True,
                                  max_new_tokens=int(max_new), default_system=server.system_prompt)
            sampling = _sampling(sample, temperature, top_k, top_p, penalty, ngram)
            settings = dataclasses.replace(defaults, max_new_tokens=int(max_new), sampling=sampling,
                                           seed=(int(seed or 0) + state["tries"]) & 0x7FFFFFFF)
            stream = server.engine.submit(prompt, settings, loop=asyncio.get_running_loop())
        except (BadInput, ValueError, EngineError) as e:
            gr.Warning(str(e))
            yield history, state, _status(server, state["tokens"])
            return
        full = (HUMAN, question), (AI, "")
        trimmed = len(prompt.tokens) < _untrimmed_length(server, conversation, question)
        state["turns"] = [*state["turns"], *full]
        history.append({"role": "assistant", "content": ""})
        answer = ""
        try:
            async for event in stream:
                if isinstance(event, str):
                    answer += event
                else:
                    answer = event.text
                    state["tokens"] = event.prompt_tokens + event.completion_tokens
                history[-1] = {"role": "assistant", "content": answer}
                state["turns"] = [*state["turns"][:-1], (AI, answer)]
                yield history, state, _status(server, state["tokens"] or len(prompt.tokens), trimmed)
        finally:
            stream.cancel()  # Stop (or a closed page): the row is ended at the next chunk

    def regenerate(history, state):
        history, state = list(history or []), dict(state)
        turns = list(state["turns"])
        if not turns or turns[-1][0] != AI or len(turns) < 2 or turns[-2][0] != HUMAN:
            gr.Warning("nothing to regenerate yet")
            return history, state, gr.MultimodalTextbox(interactive=False)
        question = turns[-2][1]
        state["turns"], state["pending"], state["tries"] = turns[:-2], question, state["tries"] + 1
        if history and history[-1]["role"] == "assistant":
            history = history[:-1]
        return history, state, gr.MultimodalTextbox(interactive=False)

    def clear():
        return [], _new_state(), _status(server, 0), gr.MultimodalTextbox(value=None, interactive=True)

    def preset_values(name):
        p = PRESETS[name]
        return p.do_sample, p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.no_repeat_ngram_size

    with gr.Blocks(title=f"owl-jax · {server.name}") as demo:
        gr.Markdown(f"### owl-jax · {server.name}\nUpload pictures with the paperclip button, ask about them, follow up.")
        chatbot = gr.Chatbot(elem_id="chatbot", height=420, buttons=["copy"], label="Conversation")
        box = gr.MultimodalTextbox(elem_id="question", file_types=["image"], file_count="multiple",
                                   sources=["upload"], placeholder="Ask about the pictures …", show_label=False,
                                   autofocus=True)
        status = gr.Markdown(_status(server), elem_id="status")
        with gr.Row():
            regenerate_button = gr.Button("↻ Regenerate", elem_id="regenerate", size="sm")
            stop_button = gr.Button("■ Stop", elem_id="stop", size="sm", variant="stop")
            clear_button = gr.Button("Clear", elem_id="clear", size="sm")
        with gr.Accordion("Generation", open=False):
            preset = gr.Radio(list(PRESETS), label="Preset",
                              value="official demo" if s == OFFICIAL_DEMO else "greedy")
            with gr.Row():
                max_new = gr.Slider(1, 2048, step=1, value=defaults.max_new_tokens, label="Max new tokens")
                seed = gr.Number(value=0, precision=0, label="Seed")
            with gr.Row():
                sample = gr.Checkbox(value=s.do_sample, label="Sample (else greedy)")
                temperature = gr.Slider(0.05, 2.0, step=0.05, value=s.temperature, label="Temperature")
            with gr.Row():
                top_k = gr.Slider(0, 100, step=1, value=s.top_k, label="Top-k (0: off)")
                top_p = gr.Slider(0.05, 1.0, step=0.01, value=s.top_p, label="Top-p (1: off)")
            with gr.Row():
                penalty = gr.Slider(1.0, 2.0, step=0.01, value=s.repetition_penalty, label="Repetition penalty")
                ngram = gr.Slider(0, 6, step=1, value=s.no_repeat_ngram_size, label="No-repeat n-gram (0: off)")
        state = gr.State(_new_state())
        gr.Examples(examples=[[e] for e in example_pictures(examples_dir)], inputs=[box], label="Examples")

        controls = [max_new, sample, temperature, top_k, top_p, penalty, ngram, seed]
        unlock = lambda: gr.MultimodalTextbox(interactive=True)  # noqa: E731
        submitted = box.submit(add_message, [chatbot, box, state], [chatbot, box, state], queue=False)
        answering = submitted.then(respond, [chatbot, state, *controls], [chatbot, state, status],
                                   concurrency_limit=None)
        answering.then(unlock, None, box)
        again = regenerate_button.click(regenerate, [chatbot, state], [chatbot, state, box], queue=False)
        regenerating = again.then(respond, [chatbot, state, *controls], [chatbot, state, status],
                                  concurrency_limit=None)
        regenerating.then(unlock, None, box)
        stop_button.click(unlock, None, box, cancels=[answering, regenerating], queue=False)
        clear_button.click(clear, None, [chatbot, state, status, box], cancels=[answering, regenerating],
                           queue=False)
        preset.change(preset_values, preset, [sample, temperature, top_k, top_p, penalty, ngram], queue=False)
        demo.load(lambda st: _status(server, st["tokens"]), state, status, queue=False)
    return demo


def _untrimmed_length(server, conversation: Conversation, question: str) -> int:
    try:
        return len(build_prompt(server.loaded, conversation, question, max_context=1 << 40, trim=False,
                                max_new_tokens=1, default_system=server.system_prompt).tokens)
    except BadInput:
        return 0


def mount_web(app, server) -> None:
    """Mount the chat page at / of `app` (after the API routes, which keep precedence)."""
    import gradio as gr
    theme = gr.themes.Default(font=_FONTS, font_mono=_MONO)
    gr.mount_gradio_app(app, build_blocks(server), path="/", theme=theme, footer_links=[],
                        max_file_size=server.options.max_body_bytes, show_error=True, ssr_mode=False,
                        mcp_server=False)
