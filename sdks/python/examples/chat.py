#!/usr/bin/env python3
"""A small interactive chat with a Realm server, streaming the model's answers.

    python examples/chat.py --url ws://127.0.0.1:8080 --key rk_acme_...   # or set REALM_KEY

Type a message and press Enter; the conversation so far goes with every
message. `/reset` forgets it, `/quit` (or Ctrl-D) leaves. Ctrl-C during an
answer stops that answer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from realm_client import Client, Generation, Message, RealmError, Sampling


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8080", help="the server (default %(default)s)")
    parser.add_argument("--key", default=os.environ.get("REALM_KEY"), help="API key (default: $REALM_KEY)")
    parser.add_argument("--model", help="model name (default: the first the tenant may use)")
    parser.add_argument("--system", help="a system prompt")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest answer (default %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default %(default)s)")
    args = parser.parse_args()
    if not args.key:
        parser.error("give --key or set REALM_KEY")
    return args


async def read_line(prompt: str) -> str | None:
    """One line from stdin without blocking the event loop; None at end of input."""
    try:
        return await asyncio.to_thread(input, prompt)
    except EOFError:
        return None


def stop_on_ctrl_c(stream: Generation) -> None:
    """While an answer streams, Ctrl-C cancels it instead of quitting."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, lambda: loop.create_task(stream.cancel()))
    except (NotImplementedError, RuntimeError):  # no signal handlers on this platform
        pass


def default_ctrl_c() -> None:
    try:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
    except (NotImplementedError, RuntimeError):
        pass


async def chat(args: argparse.Namespace) -> int:
    async with Client.connect(args.url, args.key) as client:
        model = args.model
        if model is None:
            models = await client.models()
            if not models:
                print(f"tenant {client.tenant} may use no model", file=sys.stderr)
                return 1
            model = models[0].name
        print(f"connected to {client.url} as {client.tenant}; chatting with {model} (/reset, /quit)")
        start: list[Message] = [{"role": "system", "content": args.system}] if args.system else []
        history = list(start)
        sampling = Sampling(temperature=args.temperature)
        while True:
            line = await read_line("> ")
            if line is None or line.strip() == "/quit":
                print()
                return 0
            if line.strip() == "/reset":
                history = list(start)
                print("(forgotten)")
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            stream = client.chat(model, history, max_tokens=args.max_tokens, sampling=sampling)
            stop_on_ctrl_c(stream)
            try:
                async for piece in stream:
                    print(piece, end="", flush=True)
                done = await stream.result()
            except RealmError as e:
                print(f"\n[error] {e}", file=sys.stderr)
                history.pop()  # not answered: leave it out
                continue
            finally:
                default_ctrl_c()
            print(f"\n[{done.usage.completion_tokens} tokens, {done.finish}]")
            history.append({"role": "assistant", "content": done.text})


def main() -> int:
    args = parse_args()
    try:
        return asyncio.run(chat(args))
    except KeyboardInterrupt:
        return 130
    except RealmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
