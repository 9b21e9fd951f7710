"""`trtqwen ui`: a chat page that streams answers from the Triton server, with settings, live stats, a stop
button that cancels the request on the server, and a panel naming what is served.

Binds 127.0.0.1 and never opens a public link unless asked (`share=True`); no analytics, no SSR.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402

from trtqwen.clients.client import DEFAULT_MAX_TOKENS, DEFAULT_SYSTEM, GenerationParams  # noqa: E402
from trtqwen.errors import UserError  # noqa: E402
from trtqwen.serve.process import is_loopback  # noqa: E402
from ui.backend import ERROR_MARK, STOPPED_MARK, Backend, stats_line  # noqa: E402

TITLE = "trtqwen · Qwen2.5 on Triton"
EXAMPLES = [
    "Explain in three sentences what in-flight batching does for an LLM server.",
    "用三句话介绍一下长城的历史。",
    'Reply with JSON only: {"name": …, "city": …, "languages": […]} for a fictional developer.',
    "Write a Python function that checks whether a string is a palindrome.",
]
RUNTIMES = {"torch": "torch (reference runtime)", "trtllm": "TensorRT-LLM engine (C++ backend)",
            "llmapi": "TensorRT-LLM LLM API (PyTorch backend)"}
# The OS's own fonts (they cover Chinese where the bundled Latin-only font does not); nothing is fetched from outside.
THEME = gr.themes.Soft(primary_hue="indigo", neutral_hue="slate",
                       font=["ui-sans-serif", "system-ui", "Segoe UI", "Noto Sans", "sans-serif"],
                       font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])
CSS = """
.gradio-container {max-width: 1280px !important; margin: auto;}
#header h1 {margin: 0; font-size: 1.6rem;}
#header p {margin: 2px 0 0 0; opacity: .75;}
#stats {min-height: 1.6em; font-size: .88rem; opacity: .9;}
#info {padding: 10px 14px; border: 1px solid var(--border-color-primary); border-radius: var(--radius-lg);
       background: var(--block-background-fill);}
#info h3 {margin-top: 0;}
#info table {width: 100%; font-size: .88rem; border-collapse: collapse; border: none !important;}
#info td {padding: 3px 6px; border: none !important; border-bottom: 1px solid var(--border-color-primary) !important;}
#info tr, #info tbody {border: none !important; background: none !important;}
#info tr:last-child td {border-bottom: none !important;}
#info td:first-child {opacity: .65; white-space: nowrap; width: 40%;}
#stop {color: #b91c1c;}
"""


def info_markdown(info: dict) -> str:
    online = info.get("status") == "online"
    dot = ("<span style='color:#16a34a'>● online</span>" if online else "<span style='color:#dc2626'>● offline</span>")
    rows = [("Server", f"<code>{info['url']}</code> {dot}"),
            ("Triton model", f"<code>{info['served']}</code>" if online else "—")]
    for key, label in (("model", "Model"), ("precision", "Precision"), ("tp", "Tensor parallel"),
                       ("runtime", "Runtime"), ("gpu", "GPU (build target)"), ("max_seq_len", "Max sequence"),
                       ("tensorrt_llm", "TensorRT-LLM")):
        if info.get(key) not in (None, ""):
            rows.append((label, str(info[key])))
    rows = [(a, RUNTIMES.get(b, b) if a == "Runtime" else b) for a, b in rows]
    table = "<table>" + "".join(f"<tr><td>{a}</td><td>{b}</td></tr>" for a, b in rows) + "</table>"
    notes = []
    if not online:
        notes.append(f"**Server unreachable:** {info.get('error', '')}")
    if info.get("record_error"):
        notes.append(info["record_error"])
    src = f"<small>from the {info['source']}</small>" if info.get("source") else ""
    return "### Served model\n" + table + "\n\n" + "\n\n".join(notes) + ("\n\n" if notes else "") + src


def build_app(backend: Backend, concurrency: int = 16) -> gr.Blocks:
    def respond(message, history, system, max_tokens, temperature, top_p, top_k, seed, request: gr.Request):
        history = list(history or [])
        message = (message or "").strip()
        if not message:
            yield "", history, "Type a message first."
            return
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        session = request.session_hash if request is not None else "api"
        cancel = backend.cancel_event(session)
        params = GenerationParams(max_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p),
                                  top_k=int(top_k), seed=None if seed in (None, "") or int(seed) < 0 else int(seed))
        yield "", history, stats_line(None, "connecting…", backend.model)
        timing, answer = None, ""
        try:
            for answer, timing in backend.stream(history[:-1], system or "", params, cancel):
                history[-1] = {"role": "assistant", "content": answer}
                yield "", history, stats_line(timing, "streaming", backend.model)
        except UserError as e:
            backend.done(session, cancel)
            history[-1] = {"role": "assistant", "content": f"{ERROR_MARK} **The model server is unavailable or the "
                           f"request failed.**\n\n{e.message}\n\nYour message was not answered; send it again once "
                           f"the server is back."}
            yield message, history, f"{ERROR_MARK} **error** · {e.message}"
            return
        backend.done(session, cancel)
        stopped = cancel.is_set()
        if stopped:
            history[-1] = {"role": "assistant", "content": (answer + "\n\n" if answer else "") + STOPPED_MARK}
        state = "stopped" if stopped else "done"
        yield "", history, stats_line(timing, state, backend.model) if timing else f"**{state}** · no tokens"

    def stop(request: gr.Request):
        backend.stop(request.session_hash if request is not None else "api")

    with gr.Blocks(title=TITLE) as demo:
        gr.HTML(f"<div id='header'><h1>{TITLE}</h1><p>Chat with the model served by Triton Inference Server"
                f" ({backend.url}). Answers stream token by token; Stop cancels the request on the server.</p></div>")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=480):
                chatbot = gr.Chatbot(elem_id="chat", label="Chat", height=540, buttons=["copy", "copy_all"],
                                     placeholder="**Ask something** — or pick an example below.",
                                     feedback_options=None)
                msg = gr.Textbox(elem_id="msg", show_label=False, lines=1, max_lines=8, autofocus=True,
                                 placeholder="Message Qwen…  (Enter sends, Shift+Enter: new line)",
                                 submit_btn=True, stop_btn=True)
                stats = gr.Markdown("", elem_id="stats")
                with gr.Row():
                    stop_btn = gr.Button("■ Stop", elem_id="stop", variant="stop", size="sm")
                    clear_btn = gr.Button("New chat", elem_id="clear", size="sm")
                gr.Examples(EXAMPLES, inputs=msg, label="Examples", api_visibility="private")
            with gr.Column(scale=2, min_width=300):
                info = gr.Markdown("### Served model\nchecking…", elem_id="info")
                refresh = gr.Button("↻ Check server", size="sm")
                system = gr.Textbox(DEFAULT_SYSTEM, label="System prompt", lines=3, elem_id="system")
                with gr.Accordion("Generation settings", open=True):
                    max_tokens = gr.Slider(1, 4096, value=DEFAULT_MAX_TOKENS, step=1, label="Max tokens", elem_id="max_tokens")
                    temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature")
                    top_p = gr.Slider(0, 1, value=0.8, step=0.05, label="Top-p")
                    top_k = gr.Slider(0, 200, value=20, step=1, label="Top-k (0 = off)")
                    seed = gr.Number(-1, label="Seed (-1 = random)", precision=0)

        inputs = [msg, chatbot, system, max_tokens, temperature, top_p, top_k, seed]
        show_info = dict(fn=lambda: info_markdown(backend.info()), outputs=info, queue=False, show_progress="hidden")
        go = msg.submit(respond, inputs, [msg, chatbot, stats], api_name="chat", concurrency_limit=concurrency,
                        show_progress="minimal")
        go.then(**show_info, api_visibility="private")
        for trigger in (msg.stop, stop_btn.click):
            trigger(stop, None, None, queue=False, api_visibility="private")
        clear_btn.click(lambda: ([], "", ""), None, [chatbot, msg, stats], queue=False, api_visibility="private")
        refresh.click(**show_info, api_visibility="private")
        demo.load(**show_info, api_visibility="private")
    return demo


def allowed_hosts(host: str) -> list[str]:
    """Host headers the page answers: on a loopback bind only loopback names, so a DNS-rebinding page (evil.example
    resolving to 127.0.0.1) is refused; a bind beyond this machine was asked for, any name reaching it is served."""
    if is_loopback(host):
        return ["127.0.0.1", "localhost", "::1", "[::1]", host]
    return ["*"]


def launch(url: str, model: str | None = None, repo: str | None = None, host: str = "127.0.0.1", port: int = 7860,
           share: bool = False, concurrency: int = 16, block: bool = True):
    """Build and serve the page; returns (demo, local url). With block=False it runs in background threads."""
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    demo = build_app(Backend(url, model, repo), concurrency)
    demo.queue(default_concurrency_limit=concurrency)
    try:
        _, local_url, _ = demo.launch(server_name=host, server_port=port, share=share, ssr_mode=False,
                                      prevent_thread_lock=not block, quiet=not block, footer_links=["api"],
                                      theme=THEME, css=CSS, strict_cors=True,
                                      app_kwargs={"middleware": [Middleware(TrustedHostMiddleware,
                                                                            allowed_hosts=allowed_hosts(host))]})
    except OSError as e:
        raise UserError(f"cannot serve the page on {host}:{port}: {e}", "pick another --port") from None
    return demo, local_url
