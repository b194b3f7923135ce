#!/usr/bin/env python
"""Interactive client for tools/run_text_generation_server.py.

    python tools/text_generation_cli.py localhost:5000                       # PUT /api, like Megatron's CLI
    python tools/text_generation_cli.py localhost:5000 --early-exit-thres 0.8 --show-exits
    python tools/text_generation_cli.py localhost:5000 --chat                # streamed chat with history

Type a prompt and press Enter; an empty line or Ctrl-D quits. With --show-exits each token is
printed with the layer it exited at. Plain mode sends Megatron's PUT /api (EE-LLM fields for
early exit); --chat streams /v1/chat/completions and keeps the conversation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="host:port or http://host:port of the server")
    p.add_argument("--api-key", default=os.environ.get("EE_SERVER_API_KEY"))
    p.add_argument("--tokens-to-generate", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--early-exit-thres", type=float, help="use early exit with this threshold (default: off)")
    p.add_argument("--self-speculative", action="store_true", help="--chat: lossless self-speculative decoding")
    p.add_argument("--chat", action="store_true", help="stream a conversation through /v1/chat/completions")
    p.add_argument("--show-exits", action="store_true", help="print each token with its exit layer")
    return p


def base_url(url: str) -> str:
    return url.rstrip("/") if "://" in url else f"http://{url.rstrip('/')}"


def ask_api(client, args, prompt: str) -> str:
    """One PUT /api round trip; returns what to print."""
    body = {"prompts": [prompt], "tokens_to_generate": args.tokens_to_generate, "temperature": args.temperature}
    if args.early_exit_thres is not None:
        body.update(use_early_exit=True, early_exit_thres=args.early_exit_thres)
    r = client.put("/api", json=body)
    out = r.json()
    if r.status_code != 200:
        return f"error {r.status_code}: {out.get('message') or out['error']['message']}"  # Megatron's shape or ours
    layers = out["exit_layers"][0]
    text = prompt + out["text"][0]
    if args.show_exits:
        tokens = out["segments"][0]
        text += "\n" + " ".join(f"{t!r}@{e}" for t, e in zip(tokens, layers))
    avg = sum(layers) / len(layers) if layers else 0.0
    return f"{text}\n[{len(layers)} tokens, average exit layer {avg:.2f}, {out['request_time']:.2f} s]"


def ask_chat(client, args, history: list[dict], prompt: str) -> None:
    """Stream one assistant turn to stdout and append both turns to `history`."""
    history.append({"role": "user", "content": prompt})
    body = {"messages": history, "max_tokens": args.tokens_to_generate, "temperature": args.temperature, "stream": True}
    if args.self_speculative:
        body["early_exit"] = {"mode": "self_speculative"}
    elif args.early_exit_thres is not None:
        body["early_exit"] = {"mode": "early_exit", "threshold": args.early_exit_thres}
    reply, layers = "", []
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            print(f"error {r.status_code}: {r.json()['error']['message']}")
            history.pop()
            return
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                print(f"\nerror: {chunk['error']['message']}")
                break
            for choice in chunk["choices"]:
                delta = choice["delta"].get("content") or ""
                layers += choice.get("early_exit", {}).get("exit_layers", [])
                reply += delta
                print(delta, end="", flush=True)
    avg = sum(layers) / len(layers) if layers else 0.0
    print(f"\n[{len(layers)} tokens, average exit layer {avg:.2f}]" if args.show_exits else "")
    history.append({"role": "assistant", "content": reply})


def main(argv=None) -> None:
    import httpx

    args = build_parser().parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    history: list[dict] = []
    with httpx.Client(base_url=base_url(args.url), headers=headers, timeout=600) as client:
        try:
            client.get("/health").raise_for_status()
        except httpx.HTTPError as e:
            sys.stderr.write(f"error: cannot reach the server at {base_url(args.url)}: {e}\n")
            sys.exit(2)
        while True:
            try:
                prompt = input("prompt> " if sys.stdin.isatty() else "")
            except EOFError:
                break
            if not prompt:
                break
            if args.chat:
                ask_chat(client, args, history, prompt)
            else:
                print(ask_api(client, args, prompt))


if __name__ == "__main__":
    main()
