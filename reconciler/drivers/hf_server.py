"""A small OpenAI-compatible server for a Hugging Face model directory, run by the transformers
driver as its child process: chat (with the model's chat template), completions, streaming, and
embeddings by mean pooling. Loaded offline from a local directory; nothing is fetched.

    python -m reconciler.drivers.hf_server --model DIR --port 8001 --served-model-name NAME
        [--server-type llm|embedding] [--max-len N] [--dtype auto|float32|bfloat16|float16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def stage(progress: float, what: str) -> None:
    """A load milestone in the log, for xgen's progress (the driver parses these lines)."""
    print(f"xgen-load-progress {progress:.2f} {what}", flush=True)


def build_app(model_dir: str, name: str, server_type: str, max_len: int, dtype: str) -> Any:
    import torch
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        dtype
    ]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stage(0.2, "libraries imported")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    stage(0.3, "tokenizer loaded")
    loader: Any = AutoModel if server_type == "embedding" else AutoModelForCausalLM
    model = loader.from_pretrained(model_dir, local_files_only=True, dtype=torch_dtype)
    stage(0.8, "weights loaded")
    model = model.to(device).eval()
    stage(0.9, f"on {device}")
    lock = threading.Lock()  # one generation at a time: a reference server, not a batching engine

    def error(status: int, message: str) -> Response:
        return JSONResponse(
            {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}},
            status_code=status,
        )

    def encode_prompt(body: dict[str, Any], chat: bool) -> Any:
        if chat:
            text = tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        else:
            text = body["prompt"] if isinstance(body["prompt"], str) else body["prompt"][0]
        ids = tokenizer(text, return_tensors="pt").input_ids[:, -max_len:]
        return ids.to(device)

    def settings(body: dict[str, Any], ids: Any) -> dict[str, Any]:
        temperature = float(body.get("temperature", 1.0) or 0.0)
        new = min(int(body.get("max_tokens") or 256), max(1, max_len - ids.shape[1]))
        out: dict[str, Any] = {"max_new_tokens": new, "pad_token_id": tokenizer.pad_token_id or 0}
        if temperature > 0:
            out.update(do_sample=True, temperature=temperature, top_p=float(body.get("top_p", 1.0)))
        else:
            out["do_sample"] = False
        if body.get("ignore_eos"):
            out["min_new_tokens"] = new
        return out

    def envelope(kind: str, created: int, rid: str) -> dict[str, Any]:
        return {"id": rid, "object": kind, "created": created, "model": name}

    async def generate(request: Request) -> Response:
        chat = request.url.path.endswith("/chat/completions")
        body = await request.json()
        if server_type != "llm":
            return error(400, f"{name} is an embedding model")
        ids = encode_prompt(body, chat)
        kwargs = settings(body, ids)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.get("stream"):
            return StreamingResponse(stream(ids, kwargs, chat, rid, created), media_type="text/event-stream")

        def run() -> Any:
            with lock, torch.no_grad():
                return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)

        out = await asyncio.to_thread(run)
        new_ids = out[0, ids.shape[1] :]
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        finish = "length" if len(new_ids) >= kwargs["max_new_tokens"] else "stop"
        usage = {
            "prompt_tokens": ids.shape[1],
            "completion_tokens": len(new_ids),
            "total_tokens": ids.shape[1] + len(new_ids),
        }
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            return JSONResponse({**envelope("chat.completion", created, rid), "choices": [choice], "usage": usage})
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return JSONResponse({**envelope("text_completion", created, rid), "choices": [choice], "usage": usage})

    async def stream(ids: Any, kwargs: dict[str, Any], chat: bool, rid: str, created: int) -> AsyncIterator[bytes]:
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()

        class Stop:  # transformers StoppingCriteria protocol: stop when the client has gone
            def __call__(self, *args: Any, **kw: Any) -> bool:
                return stop.is_set()

        def run() -> None:
            with lock, torch.no_grad():
                model.generate(
                    ids, attention_mask=torch.ones_like(ids), streamer=streamer, stopping_criteria=[Stop()], **kwargs
                )

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        kind = "chat.completion.chunk" if chat else "text_completion"
        try:
            if chat:
                first = {**envelope(kind, created, rid), "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
                yield f"data: {json.dumps(first)}\n\n".encode()
            while True:
                piece = await asyncio.to_thread(next, streamer, None)
                if piece is None:
                    break
                if not piece:
                    continue
                choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                yield f"data: {json.dumps({**envelope(kind, created, rid), 'choices': [choice]})}\n\n".encode()
            end: dict[str, Any] = {"index": 0, "finish_reason": "length"}
            if chat:
                end["delta"] = {}
            else:
                end["text"] = ""
            yield f"data: {json.dumps({**envelope(kind, created, rid), 'choices': [end]})}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            stop.set()  # a client that went away stops the generation at the next token

    async def embeddings(request: Request) -> Response:
        body = await request.json()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]

        def run() -> Any:
            batch = tokenizer(inputs, return_tensors="pt", padding=True, truncation=True, max_length=max_len).to(device)
            with lock, torch.no_grad():
                hidden = model(**batch).last_hidden_state
            mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # mean pooling over real tokens
            return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().tolist(), int(batch.attention_mask.sum())

        vectors, tokens = await asyncio.to_thread(run)
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        return JSONResponse(
            {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        )

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "xgen"}]})

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/chat/completions", generate, methods=["POST"]),
            Route("/v1/completions", generate, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server-type", choices=["llm", "embedding"], default="llm")
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    import uvicorn

    app = build_app(args.model, args.served_model_name, args.server_type, args.max_len, args.dtype)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
