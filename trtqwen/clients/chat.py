"""`trtqwen chat`: a terminal chat that streams answers from the served model, keeps history, shows tokens/s."""

from __future__ import annotations

from rich.console import Console

from trtqwen.clients.client import GenerationParams, chatml, connect
from trtqwen.errors import UserError


def chat_loop(url: str, model: str | None, system: str, params: GenerationParams, console: Console) -> None:
    client = connect(url, model)
    history: list[dict] = []
    console.print(f"[dim]chatting with {client.model} at {url} — /reset clears the history, Ctrl-D quits[/]")
    while True:
        try:
            user = console.input("[bold green]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if user.strip() == "/reset":
            history.clear()
            continue
        if not user.strip():
            continue
        history.append({"role": "user", "content": user})
        answer, timing = [], None
        console.print("[bold blue]qwen>[/] ", end="")
        try:
            for delta, timing in client.stream(chatml(history, system), params):
                answer.append(delta)
                console.print(delta, end="", markup=False, highlight=False)
        except UserError as e:
            console.print(f"\n[red]{e.message}[/]")
            history.pop()
            continue
        except KeyboardInterrupt:  # stops this answer, keeps the conversation
            console.print("\n[dim](stopped)[/]")
        history.append({"role": "assistant", "content": "".join(answer)})
        if timing and timing.ttft is not None:
            rate = f", {timing.tokens_per_s:.1f} tok/s" if timing.tokens_per_s else ""
            console.print(f"\n[dim]{timing.output_tokens} tokens, first after {timing.ttft * 1e3:.0f} ms{rate}[/]")
